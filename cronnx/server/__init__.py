"""The server process: composition (`main.py`), reload, and the routes only it answers (health,
readiness, models, metrics, admin, V2 metadata); `/predict` and V2 infer are `http/`'s."""
