"""From the config to the exact set of model versions to serve, each checked before it starts.

A version is one model file under one name: a `models[]` entry with `path` is one version; an
entry with `repository`, or a folder of `server.model_repository`, holds `<version>/model.onnx`
folders, of which the version policy picks some.

What `server.model_repository` holds is found, not named, so it is read forgivingly: an entry
that is not a model (a hidden entry, a plain file, a folder without any `<version>/` folder, such
as `lost+found` or `__pycache__`) is skipped with one log line, and a model folder that cannot be
served is refused alone, with its reason, while the others serve. Within one model, two version
folders naming one number (`1/` and `01/`) refuse the model, and a folder whose number is outside
1 to 2**63-1 (config.MAX_VERSION) is refused alone.
"""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path
from typing import NamedTuple

import msgspec
import msgspec.yaml

from cronnx.config import MODEL_NAME_PATTERN, Config, ConfigError, ModelConfig, version_number
from cronnx.models import snapshot
from cronnx.models.demo import DEMO_DESCRIPTIONS, write_demo_model
from cronnx.models.snapshot import ModelBytes
from cronnx.models.spec import ModelSpec, ModelSpecError, inspect_model

log = logging.getLogger("cronnx.catalog")

MODEL_FILE = "model.onnx"
MODEL_SETTINGS_FILE = "config.yaml"

# (model name, version): how the registry and /models name a version, and a refused model (under
# its `version`, 1 unless set, when it is refused as a whole).
Key = tuple[str, int]


class ModelVersion(msgspec.Struct, frozen=True):
    name: str
    version: int
    path: str
    config: ModelConfig
    # Where it came from, for error messages: "config.yaml: models[0] (resnet)".
    where: str
    # Found in server.model_repository rather than named in `models`: a problem refuses this
    # model alone, even at start-up.
    in_repository: bool = False


class PreparedVersion(msgspec.Struct, frozen=True):
    """A version read and checked (`prepare`): its bytes (`file`, what every one of its workers
    loads, whatever its file holds later), what they are (`spec`), and its labels."""

    model: ModelVersion
    spec: ModelSpec
    providers: list[str]
    labels: list[str]
    file: ModelBytes

    @property
    def fingerprint(self) -> tuple:
        """Changes when anything the version is made of changes (the model's bytes, its settings,
        its labels): a reload then replaces it. The bytes count by their digest, not by the file's
        size and time, which a copy over the file can leave as they were."""
        return (self.file.digest, msgspec.msgpack.encode(self.model.config), tuple(self.labels))

    @property
    def batch_size(self) -> int:
        """The most requests one batch runs: a fixed batch dimension in the model wins over the
        config (that many rows run, padded with zeros when fewer requests wait)."""
        return self.spec.fixed_batch or self.model.config.batch_size

    @property
    def batch_buckets(self) -> list[int]:
        """The batch sizes the worker's sessions run, one session each ([]: one session for any
        size). A fixed batch dimension is the only bucket; unset, CUDA gets powers of two up to
        the batch size (a CUDA session is slow at every change of its input shape) and the CPU
        gets [] (see bench/README.md, "Batch buckets on the CPU")."""
        if self.spec.fixed_batch:
            return [self.spec.fixed_batch]
        configured = self.model.config.batch_buckets
        if configured is not None:
            return configured
        if "CUDAExecutionProvider" in self.providers:
            return powers_of_two_up_to(self.batch_size)
        return []


def powers_of_two_up_to(size: int) -> list[int]:
    """1, 2, 4, ... below `size`, then `size` itself: [1, 2, 4, 8] for 8, [1, 2, 4, 6] for 6."""
    buckets = []
    bucket = 1
    while bucket < size:
        buckets.append(bucket)
        bucket *= 2
    return [*buckets, size]


class ConfiguredModel(NamedTuple):
    """A model the config names (a `models` entry) or finds (a folder of the repository)."""

    config: ModelConfig
    # For error messages: "cronnx.yaml: models[0] (resnet)", "/models/resnet/config.yaml (resnet)".
    where: str
    in_repository: bool


class Configured(NamedTuple):
    """What the config says to serve: its models, and the repository folders that are models but
    cannot be served, each under (name, 1) with the reason."""

    models: list[ConfiguredModel]
    refused: dict[Key, str]


def model_configs(config: Config, config_path: str) -> Configured:
    """The configured models with where each came from: explicit entries, then the model folders
    of server.model_repository (a folder named like an explicit entry is that entry's).

    In the repository, what is not a model is skipped with one log line each (`_not_a_model`),
    and a model folder with an unusable name or config.yaml is refused, in `refused`, not raised.
    Raises ConfigError only when the repository itself cannot be read."""
    found = [ConfiguredModel(m, f"{config_path}: models[{i}] ({m.name})", False) for i, m in enumerate(config.models)]
    refused: dict[Key, str] = {}
    root = config.server.model_repository
    if root is None:
        return Configured(found, refused)
    explicit = {m.name for m in config.models}
    try:
        entries = sorted(p for p in Path(root).iterdir() if p.name not in explicit)
    except OSError as exc:
        raise ConfigError(f"{config_path}: server.model_repository: cannot read {root!r}: {exc.strerror}") from None
    for entry in entries:
        skipped = _not_a_model(entry)
        if skipped is not None:
            log.info("model repository: skipping %s: %s", entry, skipped)
            continue
        model, reason = _repository_model(entry)
        if model is None:
            refused[(entry.name, 1)] = reason
        else:
            found.append(model)
    return Configured(found, refused)


def _not_a_model(entry: Path) -> str | None:
    """Why an entry of the model repository is not a model, or None when it is one: a folder,
    not hidden, with at least one version folder (a name of ASCII digits) in it. Disks, notebooks
    and Python leave such entries in any folder (`lost+found`, `.ipynb_checkpoints`,
    `__pycache__`); Triton's layout has no other use for them."""
    if entry.name.startswith("."):
        return "hidden"
    if not entry.is_dir():
        return "not a folder"
    try:
        if not any(_is_version_name(child.name) and child.is_dir() for child in entry.iterdir()):
            return f"no <version>/ folder in it (a model is <name>/<version>/{MODEL_FILE})"
    except OSError:
        return None  # a model that cannot be read: reading its versions refuses it with the reason
    return None


def _is_version_name(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _repository_model(folder: Path) -> tuple[ConfiguredModel | None, str]:
    """The model a repository folder holds, or None and the reason it cannot be served."""
    settings_file = folder / MODEL_SETTINGS_FILE
    if not re.fullmatch(MODEL_NAME_PATTERN, folder.name):
        return None, (f"{folder}: {folder.name!r} is not a model name (letters, digits, '_', '.' and '-', "
                      "starting with a letter or digit, at most 64)")
    try:
        text = settings_file.read_bytes()
    except FileNotFoundError:
        text = None
    except OSError as exc:
        return None, f"{settings_file} ({folder.name}): cannot read: {exc.strerror}"
    where = f"{folder if text is None else settings_file} ({folder.name})"
    try:
        settings = msgspec.yaml.decode(text) if text is not None else {}
        settings = {**(settings or {}), "name": folder.name, "repository": str(folder)}
        return ConfiguredModel(msgspec.convert(settings, ModelConfig), where, True), ""
    except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as exc:
        return None, f"{where}: {exc}"


def versions_of(model: ModelConfig, where: str, in_repository: bool = False) -> list[ModelVersion]:
    """The versions of a model that its version policy picks, each with its file.

    A version folder is named by its number in ASCII digits; leading zeros name the same number.
    One whose number is outside 1 to 2**63-1 is not served (one log line) and the others are.
    Raises ConfigError when the model cannot be served: its repository cannot be read, two
    folders name one version (`1/` and `01/`: which one is meant cannot be known, so neither is
    chosen), a version the policy names has no model file, no version is left, or `traffic`
    names a version not served."""
    if model.path is not None:
        return [ModelVersion(model.name, model.version, model.path, model, where, in_repository)]
    root = Path(model.repository)
    try:
        folders = sorted(p for p in root.iterdir() if _is_version_name(p.name) and (p / MODEL_FILE).is_file())
    except OSError as exc:
        raise ConfigError(f"{where}.repository: cannot read {str(root)!r}: {exc.strerror}") from None
    by_version: dict[int, Path] = {}
    out_of_range: list[str] = []
    for folder in folders:
        version = version_number(folder.name)
        if version is None:
            # Versions cross the pipes as int64 (config.MAX_VERSION), and 0 is no version.
            log.error("%s.repository: %s is not served: version %s is outside 1 to 2**63-1",
                      where, folder, folder.name)
            out_of_range.append(folder.name)
        elif version in by_version:
            raise ConfigError(f"{where}.repository: {by_version[version]} and {folder} are both version {version}; "
                              "remove or rename one")
        else:
            by_version[version] = folder
    available = sorted(by_version)
    policy = model.version_policy
    if policy.specific is not None:
        missing = sorted(set(policy.specific) - set(available))
        if missing:
            raise ConfigError(f"{where}.version_policy: versions {missing} have no {root}/<version>/{MODEL_FILE}")
        chosen = sorted(policy.specific)
    elif policy.latest is not None:
        chosen = available[-policy.latest:]
    else:
        chosen = available
    if not chosen:
        beyond = f" (versions outside 1 to 2**63-1 are not served: {', '.join(out_of_range)})" if out_of_range else ""
        raise ConfigError(f"{where}.repository: no {root}/<version>/{MODEL_FILE} found{beyond}")
    if model.traffic:
        unserved = sorted(set(model.traffic) - set(chosen))
        if unserved:
            raise ConfigError(f"{where}.traffic: versions {unserved} are not served (served: {chosen})")
    return [ModelVersion(model.name, v, str(by_version[v] / MODEL_FILE), model, where, in_repository) for v in chosen]


def all_versions(config: Config, config_path: str) -> tuple[list[ModelVersion], dict[Key, str]]:
    """Every version to serve at start-up, and the models of the repository refused, with the
    reasons. Raises ConfigError for a `models` entry that cannot be served (the config names it:
    start-up stops and says why), for a repository that cannot be read, and when the config has
    no model at all."""
    configured = model_configs(config, config_path)
    versions: list[ModelVersion] = []
    refused = dict(configured.refused)
    for model, where, in_repository in configured.models:
        try:
            versions += versions_of(model, where, in_repository)
        except ConfigError as exc:
            if not in_repository:
                raise
            refused[(model.name, model.version)] = str(exc)
    if not versions and not refused:
        raise ConfigError(f"{config_path}: no models to serve")
    return versions, refused


def resolve_providers(requested: list[str] | str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise ConfigError(f"providers {missing} are not available in this onnxruntime build; available: {available}")
    return list(requested)


def load_labels(path: str | None, num_classes: int, default_prefix: str) -> list[str]:
    """One label per line, class 0 first.

    Labels files are saved by every editor and tool there is, so none of what they add is part of
    a label: a byte-order mark (UTF-8 ones from Windows editors; UTF-16 and UTF-32 ones, which also
    say the encoding, from Notepad's "Unicode"), CRLF or CR line endings, blank lines (at the end,
    mostly) and spaces around a label. Without a byte-order mark the file is UTF-8.
    """
    if path is None:
        return [f"{default_prefix}{i}" for i in range(num_classes)]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"labels file {path}: {exc.strerror}") from None
    # UTF-32's marks start with UTF-16's, so they are looked for first.
    boms = [(codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
            (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
    encoding = next((name for bom, name in boms if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {path} is not UTF-8 text (nor UTF-16 or UTF-32 with a byte-order mark)") from None
    if "\0" in text:
        # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL in every other character.
        raise ConfigError(f"labels file {path} holds NUL characters: UTF-16 without a byte-order mark? "
                          "Save it as UTF-8")
    # Only CRLF, CR and LF end a line (str.splitlines would also split on form feeds, U+2028, ...);
    # a mark left in the middle of the file (files joined with `cat`) is stripped like a space.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    labels = [label for line in lines if (label := line.strip().strip("\ufeff").strip())]
    if len(labels) != num_classes:
        raise ConfigError(f"labels file {path} has {len(labels)} labels; the model has {num_classes} classes")
    return labels


def needs_demo_build(version: ModelVersion) -> bool:
    """A demo model whose file is still to be built (about 15 s for the MobileNetV2)."""
    return version.config.demo and not Path(version.path).is_file()


def prepare(version: ModelVersion) -> PreparedVersion:
    """Read the model's bytes once (kept for the version's life: `snapshot.keep`), its labels and
    settings, and check everything about them; ConfigError names what is wrong."""
    model = version.config
    where = version.where
    path = Path(version.path)
    if not path.is_file():
        if not model.demo:
            raise ConfigError(f"{where}.path: model file {str(path)!r} does not exist")
        log.warning("building the demo model at %s (untrained, deterministic; takes a few seconds)", path)
        write_demo_model(path)
    try:
        kept = snapshot.keep(str(path))
    except OSError as exc:
        raise ConfigError(f"{where}.path: cannot read model file {str(path)!r}, or keep a copy of it in "
                          f"TMPDIR: {exc.strerror}") from None
    if not kept.kept:
        log.warning("model %s keeps its weights in external data files: its workers load them by name, so a "
                    "worker that restarts loads whatever they hold then; replace them only together with a reload",
                    model.name)
    try:
        spec = inspect_model(kept.path, model.preprocess.size)
    except ModelSpecError as exc:
        # The copy has no name of its own: say the file's.
        raise ConfigError(f"{where}.path: {str(exc).replace(kept.path, str(path))}") from None
    try:
        providers = resolve_providers(model.providers)
        labels = load_labels(model.labels, spec.num_classes, "demo_class_" if model.demo else "class_")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    fixed = spec.fixed_batch
    if fixed and model.batch_buckets and model.batch_buckets != [fixed]:
        raise ConfigError(f"{where}.batch_buckets: the model's batch dimension is fixed at {fixed}, so it runs "
                          f"only batches of {fixed}; got {model.batch_buckets}")
    if spec.description in DEMO_DESCRIPTIONS.values():
        log.warning("model %s is the UNTRAINED DEMO model: its predictions carry no meaning", model.name)
    prepared = PreparedVersion(version, spec, providers, labels, kept)
    if model.cuda.enable_cuda_graph and "CUDAExecutionProvider" in providers and not prepared.batch_buckets:
        raise ConfigError(f"{where}.cuda.enable_cuda_graph: CUDA graphs need one input shape per session; "
                          "batch_buckets [] gives one session every batch size")
    return prepared
