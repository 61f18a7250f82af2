"""`python -m bench.gpu_check`, from the repo root. The guard keeps the preprocessing-limit
processes (spawned: they import this module again as __mp_main__) from running the check."""

from .cli import main

if __name__ == "__main__":
    main()
