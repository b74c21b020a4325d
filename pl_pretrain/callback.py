"""PretrainerCallback: pretrained weights in a Lightning Trainer, on every strategy.

This is the only module of pl_pretrain that imports Lightning. It runs the Pretrainer's distributed
protocol inside ``Callback.setup`` (the process group exists, the model is not wrapped yet), loads
right after ``configure_model`` when the LightningModule builds layers there, stays out of the way
of a checkpoint resume and of ``test`` after ``fit``, and records in every Lightning checkpoint
where the initial weights came from.

Lightning Fabric users call `load_pretrained(fabric, pretrainer)` instead.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pl_pretrain._constants import DEFAULT_COLLECT_IN
from pl_pretrain._materialize import materialize_meta
from pl_pretrain._provenance import changed_sources, configured_sources, hyperparameters, stamped
from pl_pretrain.distributed import as_per_node
from pl_pretrain.errors import ConfigurationError
from pl_pretrain.fetching import FetchConfig, LocalStrategy, as_fetch_config, as_local_strategy
from pl_pretrain.pretrainer import Pretrainer
from pl_pretrain.transfer import TransferOptions, TransferReport, format_reports, incomplete_keys

__all__ = ["PretrainerCallback", "load_pretrained"]

log = logging.getLogger(__name__)

_STAGES = ("fit", "validate", "test", "predict")
_SELF = "self"


class PretrainerCallback(Callback):
    r"""Loads pretrained parameters into a LightningModule before training, on every rank.

    In ``setup``, the fetching rank (global rank 0, or the first rank of each node whose folder is
    not shared) collects the files, the other ranks wait for it, and every rank loads the same
    files, before the strategy wraps the model (DDP, FSDP). A failure on any rank is raised on
    every rank with the key, the source and the cause. When the LightningModule builds layers in
    ``configure_model``, the load happens right after that hook; layers built there on the
    ``meta`` device are first materialised with their own ``reset_parameters()``, so that a
    sharded model (``ModelParallelStrategy``: FSDP2, tensor parallel) gets the files' weights, each
    rank its own slices, and layers no file holds (a new head) their initialisation, once.

    It does not fight Lightning: with ``trainer.fit(model, ckpt_path=...)`` Lightning restores the
    checkpoint after ``setup``, so the resumed weights win over the pretrained ones (the files are
    still fetched and loaded first: Lightning tells a callback of a resume only after ``setup``).
    To resume without fetching, give the checkpoint through Lightning's public setter before the
    run, ``trainer.ckpt_path = "last.ckpt"; trainer.fit(model)``: the callback sees it in ``setup``
    and fetches nothing. ``trainer.test(model)`` after ``trainer.fit(model)`` does not load the
    pretrained weights over the fine-tuned ones; ``trainer.test(other_model)`` loads them into it.

    Args:
        pretrainer: a ready `Pretrainer`. Give either this or the Pretrainer's arguments below.
        collect_in: folder where files are collected as ``<key>.ckpt``; ``None`` loads them from
            where they live (source folder, Hub cache).
        loadables: key -> object, or key -> dotted attribute path on the LightningModule
            (``"encoder"``, ``"model.decoder"``; ``"self"`` is the LightningModule itself), so the
            callback can be written in LightningCLI YAML.
        paths: key -> ``"<source>/<file>"`` (local path, URL, Hub ``org/repo/file``).
        default_source: where keys without a path are looked for, as ``<default_source>/<key>.ckpt``.
        custom_hooks: key -> ``hook(obj, path)``.
        conditions: key -> bool or zero-argument callable; false skips the key.
        checksums: key -> ``"sha256:<hex>"``, verified after fetching and before loading.
        transfer_options: key -> `TransferOptions` (or a dict of its fields): key mapping, shape
            policy, strictness, safe loading.
        local_strategy: how files are placed in `collect_in` (`LocalStrategy`).
        fetch_config: `FetchConfig` (revision, token, offline, retries...).
        collect_per_node: ``"auto"`` one fetch per job, streamed to nodes that do not share the
            collection folder; ``True`` one fetch per node; ``False`` one per job, an error where
            the folder is not shared (see docs/distributed.md).
        stages: the Trainer entry points that may load (``"fit"``, ``"validate"``, ``"test"``,
            ``"predict"``). A module is loaded at most once: ``test`` after ``fit`` keeps the
            fine-tuned weights; ``test`` on a fresh module loads.
        freeze: ``True`` freezes every loaded module, or a list of keys to freeze (with
            `BaseFinetuning.freeze`, so `BaseFinetuning` callbacks can unfreeze them later).
        freeze_bn: also freeze the batch-norm layers inside the frozen modules: their weights
            stop training and their running statistics stop updating
            (``BaseFinetuning.freeze(train_bn=False)``). Default ``False``: as Lightning's
            ``BaseFinetuning.freeze`` does by default, batch norms in a frozen module stay
            trainable and keep updating their running statistics.
        log_report: log the load report on rank zero and send it to the Trainer's loggers.
        timeout: how long ranks wait for the fetching rank (default 24 h).

    Example::

        import lightning as L
        from pl_pretrain import PretrainerCallback

        cb = PretrainerCallback(
            collect_in="pretrained",
            loadables={"encoder": "encoder"},
            paths={"encoder": "org/asr-model/encoder.ckpt"},
        )
        trainer = L.Trainer(strategy="ddp", devices=4, callbacks=[cb])
        trainer.fit(model)
    """

    def __init__(
        self,
        pretrainer: Pretrainer | None = None,
        *,
        collect_in: str | os.PathLike | None = DEFAULT_COLLECT_IN,
        loadables: Mapping[str, Any] | None = None,
        paths: Mapping[str, Any] | None = None,
        default_source: str | os.PathLike | None = None,
        custom_hooks: Mapping[str, Callable] | None = None,
        conditions: Mapping[str, Any] | None = None,
        checksums: Mapping[str, str] | None = None,
        transfer_options: Mapping[str, TransferOptions | dict] | None = None,
        local_strategy: LocalStrategy = LocalStrategy.SYMLINK,
        fetch_config: FetchConfig | None = None,
        collect_per_node: bool | Literal["auto"] = "auto",
        stages: Sequence[str] = _STAGES,
        freeze: bool | Sequence[str] = False,
        freeze_bn: bool = False,
        log_report: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        given = {
            "loadables": loadables,
            "paths": paths,
            "custom_hooks": custom_hooks,
            "conditions": conditions,
            "checksums": checksums,
            "transfer_options": transfer_options,
        }
        if pretrainer is not None:
            extra = [name for name, value in given.items() if value]
            if extra:
                raise ConfigurationError(
                    f"PretrainerCallback got a Pretrainer and also {', '.join(extra)}.",
                    hint="Give either a ready Pretrainer, or the Pretrainer's arguments, not both.",
                )
            if not isinstance(pretrainer, Pretrainer):
                raise ConfigurationError(f"pretrainer is a {type(pretrainer).__name__}, not a pl_pretrain.Pretrainer.")
            self.pretrainer = pretrainer
        else:
            self.pretrainer = Pretrainer(
                collect_in,
                loadables,
                paths,
                custom_hooks,
                conditions,
                checksums=checksums,
                transfer_options=transfer_options,
            )
        if not self.pretrainer.loadables:
            raise ConfigurationError(
                "PretrainerCallback has nothing to load.",
                hint="Pass loadables={'encoder': 'encoder'} (attribute paths on the LightningModule) or objects.",
            )
        unknown_stages = [s for s in stages if s not in _STAGES]
        if isinstance(stages, str) or unknown_stages:
            raise ConfigurationError(
                f"stages={stages!r} must be a list drawn from {list(_STAGES)}.",
                hint="For example stages=['fit'] loads only when training starts.",
            )
        if not isinstance(freeze, bool):
            unknown = sorted(set(freeze) - set(self.pretrainer.loadables))
            if isinstance(freeze, str) or unknown:
                raise ConfigurationError(
                    f"freeze={freeze!r} names {unknown or [freeze]}, which are not loadable keys "
                    f"({', '.join(sorted(self.pretrainer.loadables))}).",
                    hint="Pass freeze=True, or a list of loadable keys.",
                )
        self.default_source = default_source
        # Checked here, so that misuse fails when the callback is built, not in setup.
        self.local_strategy = as_local_strategy(local_strategy)
        self.fetch_config = as_fetch_config(fetch_config)
        self.collect_per_node = as_per_node(collect_per_node)  # misuse fails here, not in setup
        self.stages = tuple(stages)
        self.freeze = freeze
        self.freeze_bn = bool(freeze_bn)
        self.log_report = log_report
        self.timeout = timeout
        # Attribute paths as configured (the Pretrainer's loadables get the resolved objects).
        self._targets: dict[str, Any] = dict(self.pretrainer.loadables)
        self._loaded_modules: weakref.WeakSet[LightningModule] = weakref.WeakSet()
        self.provenance: dict[str, dict[str, Any]] = {}
        self.reports: dict[str, TransferReport | None] = {}
        self.resumed_from: str | None = None
        # What `trainer.ckpt_path` held when this callback's last run ended: Lightning does not
        # reset it, so at the next `setup` only another value is a path the user has just set.
        self._ckpt_path_at_end: str | None = None
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            collect_in=str(self.pretrainer.collect_in), keys=sorted(self.pretrainer.loadables)
        )

    # ----------------------------------------------------------------------------------------
    # Hooks
    # ----------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Collects the files (fetching rank only), then loads them on every rank, before wrapping."""
        stage = str(getattr(stage, "value", stage))
        if stage not in self.stages:
            return
        resuming = self._user_set_ckpt_path(trainer)
        load = not self._already_loaded(trainer, pl_module) and resuming is None
        if resuming is not None:
            self.resumed_from = resuming
            rank_zero_info(f"pl_pretrain: trainer.ckpt_path is {resuming}; its weights win, nothing is fetched.")
        freeze = bool(self.freeze) and stage == "fit"  # also on resume: the frozen part stays frozen
        if load:
            self.collect()
        if not load and not freeze:
            return
        if is_overridden("configure_model", pl_module):
            self._after_configure_model(trainer, pl_module, load, freeze)
        else:
            self._finish(trainer, pl_module, load, freeze)

    def state_dict(self) -> dict[str, Any]:
        """Returns where the initial weights came from, per loadable, for the checkpoint."""
        return {"version": 1, "provenance": self.provenance, "sources": self.configured_sources()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the recorded provenance, and warns when this run is configured with other sources."""
        # Lightning calls this only when it restores a checkpoint (after `setup`): the restore
        # replaces the weights loaded there, as `BaseFinetuning` learns of a resume here too.
        self._restored = True
        recorded = state_dict.get("sources", {})
        self.provenance = dict(state_dict.get("provenance", {}))
        configured = self.configured_sources()
        changed = changed_sources(recorded, configured)
        if changed:
            rank_zero_warn(
                "pl_pretrain: the checkpoint being resumed was initialised from other pretrained sources than this run "
                f"is configured with (keys: {', '.join(changed)}). Recorded: {recorded}. Configured: {configured}. "
                "The resumed weights are kept."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Records which checkpoint was resumed (its weights replaced the pretrained ones)."""
        if self._restored and trainer.ckpt_path is not None:
            self.resumed_from = str(trainer.ckpt_path)
            rank_zero_info(f"pl_pretrain: resumed from {trainer.ckpt_path}; its weights replaced the pretrained ones.")
        self._restored = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remembers what the run leaves behind, so that the next run on this Trainer is not mistaken for it."""
        self._ckpt_path_at_end = None if trainer.ckpt_path is None else str(trainer.ckpt_path)
        if pl_module in self._loaded_modules and multiprocessing.parent_process() is not None:
            # A worker's results go back to its parent only as the weights and `trainer.state`
            # (Lightning's ddp_spawn returns nothing else, and has no public place for a
            # callback's own results): the weights' fingerprint on the state lets the parent's
            # next run (`trainer.test(model)`, in new workers) recognise the module it got back.
            marks = dict(getattr(trainer.state, "_pl_pretrain_loaded", {}))
            marks[self.state_key] = _fingerprint(pl_module)
            trainer.state._pl_pretrain_loaded = marks  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------------------------
    # Steps (each does one thing)
    # ----------------------------------------------------------------------------------------

    def collect(self) -> None:
        """Runs the distributed collection: one fetch per job or node, the same files on every rank."""
        self.pretrainer.collect_files(
            self.default_source,
            internal_ddp_handling=True,
            local_strategy=self.local_strategy,
            fetch_config=self.fetch_config,
            collect_per_node=self.collect_per_node,
            timeout=self.timeout,
        )

    def load(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, TransferReport | None]:
        """Loads the collected files into the (resolved) loadables on every rank; returns the reports."""
        self.pretrainer.add_loadables(self._resolve_targets(pl_module))
        started = time.time()
        reports = self.pretrainer.load_collected(log_report=False)  # logged below, the Lightning way
        self.reports = reports
        self._mark_loaded(trainer, pl_module)
        self.provenance = stamped(self.pretrainer.provenance())
        if self.log_report:
            self._log(trainer, reports, time.time() - started)
        return reports

    def freeze_loaded(self, pl_module: LightningModule) -> None:
        """Freezes the modules chosen by `freeze` (requires_grad off, via BaseFinetuning.freeze)."""
        if not self.freeze:
            return
        keys = list(self._targets) if self.freeze is True else list(self.freeze)
        resolved = self._resolve_targets(pl_module)
        modules = [resolved[k] for k in keys if isinstance(resolved.get(k), torch.nn.Module)]
        BaseFinetuning.freeze(modules, train_bn=not self.freeze_bn)

    def configured_sources(self) -> dict[str, dict[str, Any]]:
        """Returns key -> the source this run is configured to load it from (no credentials)."""
        return configured_sources(self.pretrainer, self.default_source, self.fetch_config)

    def _already_loaded(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        if pl_module in self._loaded_modules:
            return True
        # Under ddp_spawn this process is a new worker with a copy of the parent's module: it is
        # the module an earlier run loaded and trained when it holds the weights that run ended with.
        marks = getattr(trainer.state, "_pl_pretrain_loaded", None)
        mark = marks.get(self.state_key) if isinstance(marks, dict) else None
        return mark is not None and mark == _fingerprint(pl_module)

    def _user_set_ckpt_path(self, trainer: Trainer) -> str | None:
        """Returns the checkpoint the user set with ``trainer.ckpt_path = ...`` for this run, else None.

        ``trainer.fit(model, ckpt_path=...)`` is known only after ``setup`` (Lightning calls
        `load_state_dict`); a value left over from this Trainer's previous run is not a resume.
        """
        path = trainer.ckpt_path
        if path is None or str(path) == self._ckpt_path_at_end:
            return None
        return str(path)

    def _mark_loaded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loaded_modules.add(pl_module)

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks into fresh processes; a WeakSet does not pickle.
        state = self.__dict__.copy()
        state["_loaded_modules"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded_modules = weakref.WeakSet()

    def materialize(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gives every module still on the meta device real memory and its own ``reset_parameters()``, once.

        Before the load, so that Lightning's own materialisation, as the strategy sets up, finds
        nothing left to re-initialise over the loaded weights (see `pl_pretrain._materialize`).
        """
        uninitialised = materialize_meta(pl_module, trainer.strategy.root_device)
        if uninitialised:
            rank_zero_warn(
                f"pl_pretrain: {', '.join(sorted(uninitialised))} had tensors on the meta device and no "
                "reset_parameters(); what the pretrained files do not fill holds uninitialised memory."
            )

    def _finish(self, trainer: Trainer, pl_module: LightningModule, load: bool, freeze: bool) -> None:
        if load:
            self.materialize(trainer, pl_module)
            self.load(trainer, pl_module)
        if freeze:
            self.freeze_loaded(pl_module)

    def _after_configure_model(self, trainer: Trainer, pl_module: LightningModule, load: bool, freeze: bool) -> None:
        # Lightning offers no callback hook between `configure_model` and the strategy wrapping
        # the model, so this instance's `configure_model` is wrapped once: the user's hook runs,
        # then the load, then the class's own method is visible again.
        original = pl_module.configure_model

        def configure_model_then_load() -> None:
            try:
                original()
            finally:
                del pl_module.configure_model
            self._finish(trainer, pl_module, load, freeze)

        configure_model_then_load.__wrapped__ = original  # type: ignore[attr-defined]  # `is_overridden` still sees the class's
        pl_module.configure_model = configure_model_then_load  # type: ignore[method-assign]

    def _resolve_targets(self, pl_module: LightningModule) -> dict[str, Any]:
        return {
            key: _resolve(pl_module, key, target) if isinstance(target, str) else target
            for key, target in self._targets.items()
        }

    def _log(self, trainer: Trainer, reports: Mapping[str, TransferReport | None], seconds: float) -> None:
        table = format_reports(self.pretrainer.shown_reports())
        if table:
            rank_zero_info(f"pl_pretrain: loaded pretrained parameters in {seconds:.2f} s\n{table}")
        incomplete = incomplete_keys(reports)
        if incomplete:
            hints = "".join(f" {key}: {r.hint()}" for key, r in reports.items() if r is not None and r.hint())
            rank_zero_warn(
                f"pl_pretrain: {', '.join(incomplete)} did not load completely (see the table above: missing, "
                f"unexpected or mismatched keys).{hints} Pass TransferOptions(strict=True) to make this an error."
            )
        for key, report in reports.items():
            for warning in report.warnings if report is not None else ():
                rank_zero_warn(f"pl_pretrain: {key}: {warning}; TransferOptions(strict=True) makes this an error.")
        hparams = hyperparameters(self.provenance, reports)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)


def _resolve(pl_module: LightningModule, key: str, path: str) -> Any:
    """Returns the object at the dotted attribute `path` of `pl_module` ("self" is the module)."""
    if path in (_SELF, ""):
        return pl_module
    obj: Any = pl_module
    walked: list[str] = []
    for part in path.split("."):
        if not hasattr(obj, part):
            where = ".".join(walked) or type(pl_module).__name__
            children = sorted(name for name, _ in getattr(obj, "named_children", lambda: [])())
            raise ConfigurationError(
                f"{type(pl_module).__name__} has no attribute '{path}' ('{part}' is missing from {where}). "
                f"{where} has: {', '.join(children) or 'no submodules'}.",
                key=key,
                hint="Give an attribute path that exists once configure_model has run, e.g. 'encoder' or "
                "'model.decoder', or pass the object itself.",
            )
        obj = getattr(obj, part)
        walked.append(part)
    return obj


def _fingerprint(module: torch.nn.Module) -> str:
    """Returns a digest of a module's parameter values (this process's part of sharded ones)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if not isinstance(local, torch.Tensor) or local.is_meta:
                continue
            values = local.detach().double()
            digest.update(f"{name}:{list(local.shape)}:{values.sum().item()!r}:{values.abs().sum().item()!r}".encode())
    return digest.hexdigest()


def load_pretrained(
    fabric: Any,
    pretrainer: Pretrainer,
    default_source: str | os.PathLike | None = None,
    **collect_options: Any,
) -> dict[str, TransferReport | None]:
    """Returns the load reports after running the collection protocol under Lightning Fabric.

    Call it after ``fabric.launch()`` (the process group exists) and before ``fabric.setup(model)``
    (so that the weights are in place before Fabric wraps or shards the model). `collect_options`
    are `Pretrainer.collect_files` keyword arguments (``local_strategy``, ``fetch_config``,
    ``collect_per_node``, ``timeout``).

    Example::

        fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()
        model = Model()
        pt = Pretrainer("pretrained", {"encoder": model.encoder}, paths={"encoder": "org/asr/encoder.ckpt"})
        load_pretrained(fabric, pt)
        model = fabric.setup(model)
    """
    if getattr(fabric, "world_size", 1) > 1 and not torch.distributed.is_initialized():
        raise ConfigurationError(
            "load_pretrained(fabric, ...) was called before fabric.launch(): the ranks cannot agree on who fetches.",
            hint="Call fabric.launch() first.",
        )
    pretrainer.collect_files(default_source, internal_ddp_handling=True, **collect_options)
    reports = pretrainer.load_collected()
    table = format_reports(reports)
    if table:
        fabric.print(f"pl_pretrain: loaded pretrained parameters\n{table}")
    return reports
