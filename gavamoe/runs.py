"""A run directory and what keeps it consistent: RUN/config.json records the data (absolute paths
and a fingerprint of the files), each stage's config, and which stage-1 model stage 2 was
trained on. Training into a run made on other data is refused; generation from a stage 2 whose
stage 1 has since changed, or whose data files changed, is refused.

    RUN/config.json          {"data": {...spec, "fingerprint"}, "stage1": {"config", "model_sha256"},
                              "stage2": {"config", "stage1_sha256"}}
    RUN/stage1/              model.pt, assignments.csv, metrics.json, plots
    RUN/stage2/              model.pt, tokenizer/, clusters.pt, metrics.json, checkpoint.pt, loss_curve.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .data import ReviewData, load_peter, make_synthetic
from .errors import UserInputError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A scratch path beside ``path`` to write to; when the block ends without an error it
    replaces ``path`` in one step, so a crash midway leaves the old file (or none), never half a
    file. On an error the scratch file is removed."""
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DataSpec:
    """The data of a run: ``data="synthetic"`` with the generator's parameters, or the path of a
    PETER reviews.pickle with an optional index folder (stored absolute)."""

    data: str = "synthetic"
    index_dir: str | None = None
    synthetic_users: int = 2000
    synthetic_items: int = 1500
    synthetic_records: int = 40000
    synthetic_groups: int = 4
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> DataSpec:
        """From the command line's namespace; paths made absolute and checked."""
        spec = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
        if spec.data != "synthetic":
            path = Path(spec.data).expanduser().resolve()
            if not path.is_file():
                raise UserInputError(f"--data {spec.data}: no such file (give 'synthetic' or a reviews.pickle)")
            spec.data = str(path)
        if spec.index_dir is not None:
            folder = Path(spec.index_dir).expanduser().resolve()
            if not folder.is_dir():
                raise UserInputError(f"--index-dir {spec.index_dir}: no such folder")
            spec.index_dir = str(folder)
        return spec

    def files(self) -> list[Path]:
        if self.data == "synthetic":
            return []
        index = [] if self.index_dir is None else [Path(self.index_dir) / f"{s}.index"
                                                   for s in ("train", "validation", "test")]
        return [Path(self.data), *index]

    def fingerprint(self) -> str:
        """sha256 over the generator's parameters, or over the data files' bytes."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for path in self.files():
            if path.exists():
                digest.update(file_sha256(path).encode())
        return digest.hexdigest()

    def load(self) -> ReviewData:
        if self.data == "synthetic":
            return make_synthetic(self.synthetic_users, self.synthetic_items, self.synthetic_records,
                                  self.synthetic_groups, seed=self.seed)
        return load_peter(self.data, self.index_dir, seed=self.seed)


class Run:
    """A run directory (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def stage1_model(self) -> Path:
        return self.path / "stage1" / "model.pt"

    @property
    def stage2_dir(self) -> Path:
        return self.path / "stage2"

    @property
    def stage2_clusters(self) -> Path:
        return self.stage2_dir / "clusters.pt"

    @property
    def stage2_checkpoint(self) -> Path:
        return self.stage2_dir / "checkpoint.pt"

    def config(self) -> dict:
        if not self.config_path.exists():
            raise UserInputError(f"{self.path} is not a gavamoe run: it has no config.json "
                                 f"(train one with python -m gavamoe.train --out {self.path})")
        return json.loads(self.config_path.read_text())

    def _write(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with replacing(self.config_path) as partial:
            partial.write_text(json.dumps(config, indent=2))

    def start(self, spec: DataSpec, fingerprint: str) -> None:
        """Begin (or continue) training in this directory. A directory that holds a run on other
        data is refused, so that no stage of it can go on with the wrong data."""
        if self.config_path.exists():
            recorded = self.config()["data"]
            if recorded["fingerprint"] != fingerprint:
                raise UserInputError(f"--out {self.path} holds a run trained on other data ({recorded['data']}); "
                                     f"give a new --out")
            return
        if (self.path / "stage1").exists() or self.stage2_dir.exists():
            raise UserInputError(f"--out {self.path} holds stage outputs but no config.json; give a new --out")
        self._write({"data": {**asdict(spec), "fingerprint": fingerprint}})

    def data_spec(self) -> DataSpec:
        recorded = dict(self.config()["data"])
        recorded.pop("fingerprint")
        return DataSpec(**recorded)

    def load_data(self) -> ReviewData:
        """The run's data, after checking that its files are still the ones it trained on."""
        spec = self.data_spec()
        missing = [str(p) for p in spec.files() if not p.exists()]
        if missing:
            raise UserInputError(f"{self.path}: the run's data files are gone: {', '.join(missing)}")
        if spec.fingerprint() != self.config()["data"]["fingerprint"]:
            raise UserInputError(f"{self.path}: the data files changed since the run was trained ({spec.data})")
        return spec.load()

    def record_stage1(self, config) -> None:
        run_config = self.config()
        run_config["stage1"] = {"config": asdict(config), "model_sha256": file_sha256(self.stage1_model)}
        self._write(run_config)

    def stage1_sha256(self) -> str:
        if not self.stage1_model.exists():
            raise UserInputError(f"{self.stage1_model} not found: run stage 1 first (--stage 1 or --stage all)")
        return file_sha256(self.stage1_model)

    def record_stage2(self, config, stage1_sha256: str) -> None:
        run_config = self.config()
        run_config["stage2"] = {"config": asdict(config), "stage1_sha256": stage1_sha256}
        self._write(run_config)

    def stage2_config(self) -> dict:
        """The stage-2 config of a finished, current stage 2 (its stage 1 unchanged since)."""
        run_config = self.config()
        if "stage2" not in run_config or not (self.stage2_dir / "model.pt").exists():
            raise UserInputError(f"{self.stage2_dir / 'model.pt'} not found: train stage 2 first "
                                 f"(python -m gavamoe.train --out {self.path})")
        if run_config["stage2"]["stage1_sha256"] != self.stage1_sha256():
            raise UserInputError(f"{self.path}: stage 2 was trained on an earlier stage 1, which has been re-run "
                                 f"since; train stage 2 again (--stage 2)")
        return run_config["stage2"]["config"]

    def fork(self, path) -> Run:
        """A new run directory holding this run's data record and stage 1 (for ablations of stage 2)."""
        other = Run(path)
        if other.path.exists():
            shutil.rmtree(other.path)
        shutil.copytree(self.path / "stage1", other.path / "stage1")
        run_config = self.config()
        run_config.pop("stage2", None)
        other._write(run_config)
        return other
