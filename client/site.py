"""One hospital for one run: the one object that training, evaluation, queries and the references use.

A :class:`Site` is built once per run from the site's YAML. It holds the site's configuration and,
computed on first use and then kept: the prepared patients (``prepared``: image cubes, clinical
vector, outcomes, and the radiomics the run's model takes), the clinical rows without images for a
site without volumes, the radiomics tables, the rows of the classical models, and the run's
train / validation / test split. Federated training (:mod:`hccfed.client.federated`), the
statistics queries (:mod:`hccfed.client.classical_site`), the simulation's centralized and
local-only references and its evaluation all go through it, as FLamby's one class per centre gives
local, pooled and federated training the same path.

``prepared`` and the classical rows are also kept on disk for the run (``snapshot_dir``, under the
site's own cache folder), so a SuperNode that starts a fresh ClientApp process per message loads
them instead of preparing again: preparation (reading the manifest, checking every file, loading
the cached cubes, writing the QC report) happens once per site per run, and each build is recorded
in ``<snapshot_dir>/builds.jsonl`` (tests count them).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from hccfed.client.prepare import PreparedScans, PreparedSite, prepare_site
from hccfed.client.site_data import SplitData, site_split, split_indices
from hccfed.common.atomic_io import atomic_savez
from hccfed.common.plan import FederationPlan, PlanError, plan_problems
from hccfed.common.run_config import RunConfig
from hccfed.common.seeds import derive_seed
from hccfed.common.site_config import ArchiveConfig, SiteConfig, load_site_config, with_archive
from hccfed.client.site_yaml import site_config_path  # noqa: F401 (re-exported)

log = logging.getLogger("hccfed.site")

SNAPSHOT_VERSION = "1"
KEEP_RUN_SNAPSHOTS = 4  # per site: older runs' snapshots are removed when a new one is made


@dataclass
class PatientRows:
    """A site's patients without images: what the clinical models need. Same fields and order as
    :class:`~hccfed.client.prepare.PreparedSite` but the images."""

    site_id: str
    patient_ids: np.ndarray
    clinical: np.ndarray
    clinical_names: list[str]
    labels: np.ndarray
    times: np.ndarray
    events: np.ndarray

    def __len__(self) -> int:
        return len(self.patient_ids)


class Site:
    """One hospital for one run (see the module docstring).

    ``seed``: the run's seed (its splits); ``radiomics_features`` / ``radiomics_params``: the
    radiomics the run's model takes (empty: none); ``snapshot_dir``: where this run's prepared data
    is kept for other processes (None: in this object only).
    """

    def __init__(self, config: SiteConfig, seed: int = 0, *, radiomics_features: Sequence[str] = (),
                 radiomics_params: str = "fast", workers: int | None = None, progress: bool = False,
                 snapshot_dir: Path | None = None, plan: FederationPlan | None = None):
        if plan is not None:
            problems = site_plan_problems(config, plan)
            if problems:
                raise PlanError("; ".join(problems))
            config = dataclasses.replace(config, preprocessing=dataclasses.replace(config.preprocessing,
                                                                                   **plan.preprocessing()))
        self.config = config
        self.plan = plan
        self.seed = int(seed)
        self.radiomics_features = tuple(radiomics_features)
        self.radiomics_params = radiomics_params
        self.workers = workers
        self.progress = progress
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self._radiomics: dict[tuple, Any] = {}
        self._classical: dict[tuple, Any] = {}
        self._lock_depth = 0

    @classmethod
    def for_run(cls, site_yaml: str | Path, run_config: RunConfig, run_key: str,
                plan: FederationPlan | None = None, **kwargs: Any) -> "Site":
        """The site of a federated run, its snapshot under ``<cache_dir>/runs/<key>``, where the key
        hashes the Flower run (``run_key``), the YAML's content and what the run asks of the site
        (its seed, radiomics and federation plan)."""
        config = load_site_config(site_yaml)
        text = Path(site_yaml).read_text()
        key = derive_seed(SNAPSHOT_VERSION, run_key, text, run_config.seed, ",".join(run_config.radiomics_features),
                          run_config.radiomics_params, plan.to_json() if plan is not None else "")
        return cls(config, run_config.seed, radiomics_features=run_config.radiomics_features,
                   radiomics_params=run_config.radiomics_params,
                   snapshot_dir=config.cache_dir / "runs" / f"{key:016x}", plan=plan, **kwargs)

    @property
    def site_id(self) -> str:
        return self.config.site_id

    # ------------------------------------------------------------------ the federation plan
    def fingerprint(self) -> dict[str, Any]:
        """The aggregates the server plans from (``hccfed.client.fingerprint``), computed once per run."""
        def build() -> dict[str, Any]:
            from hccfed.client.fingerprint import site_fingerprint

            return site_fingerprint(self.config, self.workers, self.progress)
        return self._kept("fingerprint", build, lambda v: {"json": np.array(json.dumps(v))},
                          lambda a: json.loads(str(a["json"])))

    # ------------------------------------------------------------------ patients
    @cached_property
    def has_volumes(self) -> bool:
        """Whether the manifest points at tumour masks that exist (a tabular-only cohort has none)."""
        def build() -> bool:
            from hccfed.client.manifest import read_manifest

            return any(Path(p).exists() for p in read_manifest(self.config, strict=False).mask_paths)
        return self._kept("has-volumes", build, lambda v: {"value": np.array(v)}, lambda a: bool(a["value"]))

    @cached_property
    def prepared(self) -> PreparedSite:
        """The prepared patients (``hccfed.client.prepare``), with the run's radiomics attached."""
        def build() -> PreparedSite:
            from hccfed.client.site_radiomics import attach_radiomics

            return attach_radiomics(self._base, self.config, self.radiomics_features, self.radiomics_params,
                                    self.workers)
        return self._kept("prepared", build, _prepared_to_arrays, _prepared_from_arrays)

    @cached_property
    def _base(self) -> PreparedSite:
        return prepare_site(self.config, workers=self.workers, progress=self.progress)

    def with_radiomics(self, features: Sequence[str], params: str = "fast") -> "Site":
        """The same site with the fusion model's radiomics ``features``; what is already prepared or
        extracted is shared, not done again (in-process use: the simulation's references)."""
        return self._sibling(self.config, features, params, ("_base", "has_volumes", "tabular", "archive"))

    def with_archive(self, archive: ArchiveConfig | None) -> "Site":
        """The same site with ``archive`` as its archive (:attr:`archive`); what is already prepared is
        shared (in-process use: the simulation's pretraining on its synthetic archives)."""
        return self._sibling(with_archive(self.config, archive), self.radiomics_features, self.radiomics_params,
                             ("_base", "has_volumes", "tabular", "prepared"))

    def _sibling(self, config: SiteConfig, features: Sequence[str], params: str, shared: Sequence[str]) -> "Site":
        """A Site of ``config`` in this process (no snapshot) that takes over this one's ``shared`` cached
        values and its radiomics tables."""
        other = Site(config, self.seed, radiomics_features=features, radiomics_params=params,
                     workers=self.workers, progress=self.progress, snapshot_dir=None)
        other.plan = self.plan  # config already holds the plan's preprocessing
        for name in shared:
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        other._radiomics = self._radiomics
        return other

    @cached_property
    def tabular(self) -> PatientRows:
        """The patients whose manifest row and labs pass QC, without images (clinical models)."""
        from hccfed.client.labs import clinical_features
        from hccfed.client.manifest import read_manifest
        from hccfed.client.qc import check_labs
        from hccfed.common.schema import clinical_feature_names, early_recurrence_label

        manifest = read_manifest(self.config, strict=False, images=False)
        table, issues = check_labs(manifest.table, self.config)
        failed = {i.patient_id for i in issues}
        table = table.loc[[p for p in manifest.patient_ids if p not in failed]]
        times = table["time_months"].to_numpy(dtype=float)
        events = table["event"].to_numpy(dtype=np.int64)
        return PatientRows(self.site_id, np.array([str(p) for p in table.index]),
                           clinical_features(table, self.config).astype(float), clinical_feature_names(),
                           early_recurrence_label(times, events), times, events)

    @property
    def rows(self) -> PreparedSite | PatientRows:
        """The site's patients: the prepared ones when it has volumes, else the clinical rows."""
        return self.prepared if self.has_volumes else self.tabular

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def archive(self) -> PreparedScans | None:
        """The site's archive (its YAML's ``archive:`` section: scans without outcomes), prepared as the
        labelled patients are (the run's plan) for self-supervised pretraining, less any labelled
        patient's scan (:func:`hccfed.client.prepare.without_labelled`); None without an archive.
        Its QC report is ``<cache_dir>/archive/qc_report.csv``."""
        if self.config.archive is None:
            return None

        def build():
            from hccfed.client.prepare import prepare_archive

            _ = self._base  # the labelled cohort prepared first: its cache holds the voxel digests compared
            return prepare_archive(self.config, self.workers, self.progress)
        return self._kept("archive", build, _prepared_to_arrays, _scans_from_arrays)

    def pretraining_images(self):
        """What this site pretrains an encoder on (``client.pretraining``): the scans of its training
        split, then those of its archive (float32, (N, C, D, H, W))."""
        import torch

        train = self.split("train").images
        if self.archive is None:
            return train
        return torch.cat([train, torch.from_numpy(self.archive.images.astype(np.float32))])

    # ------------------------------------------------------------------ splits
    @cached_property
    def split_indices(self) -> dict[str, np.ndarray]:
        """Row indices of each split of :attr:`rows` (``hccfed.client.site_data.split_indices``)."""
        return split_indices(self.rows, self.seed)

    def split(self, name: str) -> SplitData:
        """One split of the prepared patients as tensors (``"all"``: every patient; "dev": training and
        validation; cross-validation folds by ``hccfed.client.site_data.cv_split_name``)."""
        return site_split(self.prepared, name, self.seed)

    # ------------------------------------------------------------------ radiomics and classical rows
    def radiomics(self, params: str = "fast", perturb_seed: int | None = None,
                  patient_ids: Sequence[str] | None = None):
        """The radiomics table of :attr:`rows`' patients, or of ``patient_ids`` among them
        (``hccfed.client.radiomics.extract_site``, cached per patient on disk); ``perturb_seed``: the
        simulated second reader's."""
        from hccfed.client.radiomics import extract_site

        patients = tuple(str(p) for p in (self.rows.patient_ids if patient_ids is None else patient_ids))
        key = (params, perturb_seed, patients)
        if key not in self._radiomics:
            self._radiomics[key] = extract_site(self.config, params, workers=self.workers, progress=self.progress,
                                                perturb_seed=perturb_seed, patient_ids=list(patients))
        return self._radiomics[key]

    def classical(self, params: str | None = "auto", second_reader_seed: int | None = None,
                  icc_patients: int | None = None, fit_on: str = "train"):
        """The rows of the classical models (``hccfed.client.classical_site.ClassicalSite``): the clinical
        vector joined with the radiomics, split like the deep models (fitted on the training split, as they are; test scored).

        ``params``: "fast", "full" or a parameter file; "auto": the fast file when the site has volumes,
        clinical only otherwise; None or "none": clinical only. ``second_reader_seed``: also the second
        reader's radiomics (the ICC filter), of ``icc_patients`` training patients drawn at random from the
        run's seed (as studies re-segment a random subset; None: every patient); the others' second-reader
        rows are NaN. ``fit_on``: "train", or "dev" (training and validation splits) beside cross-validated
        deep models.
        """
        from hccfed.client.classical_site import add_second_reader, join_site

        if params == "auto":
            params = "fast" if self.has_volumes else None
        params = None if params in (None, "none") else params
        key = (params, second_reader_seed, icc_patients, fit_on)
        if key not in self._classical:
            def build():
                table = None if params is None else self.radiomics(params)
                site = join_site(self.rows, table, self.seed, fit_on)
                if second_reader_seed is not None and table is not None:
                    rows = np.arange(len(site.patient_ids))
                    if icc_patients is not None and len(site.train) > icc_patients:
                        rng = np.random.default_rng(derive_seed(self.seed, self.site_id, "icc-patients"))
                        rows = np.sort(rng.choice(site.train, icc_patients, replace=False))
                    second = self.radiomics(params, second_reader_seed, [str(p) for p in site.patient_ids[rows]])
                    add_second_reader(site, table, second)
                return site
            # the name of a split fitted on "train" is the one of the caches written before ``fit_on`` existed
            extra = () if fit_on == "train" else (fit_on,)
            name = f"classical-{derive_seed(params, second_reader_seed, icc_patients, *extra):016x}"
            self._classical[key] = self._kept(name, build, _dataclass_to_arrays, _classical_from_arrays)
        return self._classical[key]

    def stats_endpoint(self, n_folds: int, params: str | None, second_reader_seed: int | None = None,
                       icc_patients: int | None = None):
        """The site's endpoint for the federated statistics over :meth:`classical` rows (kept per setup)."""
        from hccfed.client.classical_site import ClassicalStatsSite

        key = ("endpoint", int(n_folds), params, second_reader_seed, icc_patients)
        if key not in self._classical:
            rows = self.classical(params, second_reader_seed, icc_patients)
            self._classical[key] = ClassicalStatsSite(rows, int(n_folds), self.seed)
        return self._classical[key]

    # ------------------------------------------------------------------ the run's snapshot
    def _kept(self, name: str, build, to_arrays, from_arrays):
        """``build()`` once per run: from this run's snapshot when another process made it, else built
        (under a lock, so two processes of one run never build the same thing twice) and saved."""
        if self.snapshot_dir is None:
            return self._built(name, build)
        path = self.snapshot_dir / f"{name}.npz"
        with self._lock():
            if path.exists():
                with np.load(path, allow_pickle=False) as data:
                    return from_arrays({k: data[k] for k in data.files})
            value = self._built(name, build)
            atomic_savez(path, **to_arrays(value))
            _prune_old_snapshots(self.snapshot_dir)
        return value

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """The run snapshot's lock, re-entrant within this object (a build may need another kept value)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with _locked(self.snapshot_dir / ".lock"):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _built(self, name: str, build):
        started = time.time()
        value = build()
        seconds = time.time() - started
        size = f"{len(value.patient_ids)} patients, " if hasattr(value, "patient_ids") else ""
        log.info("site %s: built %s for the run (%s%.1f s)", self.site_id, name, size, seconds)
        if self.snapshot_dir is not None:
            record = {"what": name, "pid": os.getpid(), "seconds": round(seconds, 3), "at": time.time()}
            with open(self.snapshot_dir / "builds.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return value


def site_plan_problems(config: SiteConfig, plan: FederationPlan) -> list[str]:
    """Why this site cannot prepare by ``plan`` (empty: it can): a planned key its YAML sets otherwise."""
    explicit = {k: getattr(config.preprocessing, k) for k in config.preprocessing_set}
    return plan_problems(config.site_id, explicit, plan)


def builds_of(snapshot_dir: Path) -> list[dict[str, Any]]:
    """The builds recorded in a run's snapshot folder (one line per build)."""
    path = Path(snapshot_dir) / "builds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune_old_snapshots(current: Path) -> None:
    """Keep the newest :data:`KEEP_RUN_SNAPSHOTS` run folders beside ``current`` (a site's disk is its own)."""
    runs = sorted((p for p in current.parent.iterdir() if p.is_dir() and p != current),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[KEEP_RUN_SNAPSHOTS - 1:]:
        for file in old.iterdir():
            file.unlink()
        old.rmdir()


def _dataclass_to_arrays(value) -> dict[str, np.ndarray]:
    out = {}
    for f in fields(value):
        item = getattr(value, f.name)
        if item is None:
            continue
        out[f.name] = np.asarray(item) if not isinstance(item, str) else np.array(item)
    return out


def _prepared_to_arrays(site: PreparedSite) -> dict[str, np.ndarray]:
    arrays = _dataclass_to_arrays(site)
    arrays.pop("qc", None)
    if site.qc is not None:
        arrays["qc"] = np.array(json.dumps(site.qc.to_dict()))
    return arrays


def _prepared_from_arrays(arrays: Mapping[str, np.ndarray]) -> PreparedSite:
    from hccfed.client.qc import QCReport

    values = dict(arrays)
    qc = values.pop("qc", None)
    site = PreparedSite(site_id=str(values.pop("site_id")), clinical_names=[str(n) for n in values.pop("clinical_names")],
                        **values)
    site.qc = None if qc is None else QCReport.from_dict(json.loads(str(qc)))
    return site


def _scans_from_arrays(arrays: Mapping[str, np.ndarray]):
    from hccfed.client.prepare import PreparedScans
    from hccfed.client.qc import QCReport

    values = dict(arrays)
    qc = values.pop("qc", None)
    return PreparedScans(str(values["site_id"]), values["patient_ids"], values["images"],
                         qc=None if qc is None else QCReport.from_dict(json.loads(str(qc))))


def _classical_from_arrays(arrays: Mapping[str, np.ndarray]):
    from hccfed.client.classical_site import ClassicalSite

    values = dict(arrays)
    return ClassicalSite(site_id=str(values.pop("site_id")), names=[str(n) for n in values.pop("names")], **values)


# ------------------------------------------------------------------ this node's site, per run
class SiteCache:
    """The sites this process serves, one per run snapshot (the Flower run, the YAML's content and what
    the run asks of the site): a ClientApp process that handles several messages of a run (Flower's
    simulation engine, the in-process test grid) builds each site once; a new run drops the old ones."""

    def __init__(self) -> None:
        self._sites: dict[Path, Site] = {}

    def for_node(self, run_config: RunConfig, node_config: Mapping[str, Any], run_key: str,
                 plan: FederationPlan | None = None) -> Site:
        site = Site.for_run(site_config_path(run_config, node_config), run_config, str(run_key), plan, workers=1)
        if site.snapshot_dir not in self._sites:
            if len(self._sites) >= 16:
                self._sites.pop(next(iter(self._sites)))
            self._sites[site.snapshot_dir] = site
        return self._sites[site.snapshot_dir]


#: The sites this process serves (the ClientApp's handlers and the SecAgg+ client share it).
NODE_SITES = SiteCache()
