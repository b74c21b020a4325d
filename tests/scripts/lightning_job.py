"""A Lightning fine-tune launched by the tests as a subprocess (ddp re-executes it per rank).

Every rank records its encoder's fingerprint when training starts into $PL_PRETRAIN_RECORD_DIR
(see tests/lightning_models.py), or the error it raised into error-rank<r>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning_models import LateModel, Model  # noqa: E402

from pl_pretrain import PretrainerCallback, PretrainerError  # noqa: E402


class LostBeforeTheCollection(L.Callback):
    """On the node named by $PL_PRETRAIN_TEST_LOST_NODE, dies or raises in `setup`, just before the collection."""

    def __init__(self, how: str) -> None:
        self.how = how

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if os.environ.get("NODE_RANK") != os.environ.get("PL_PRETRAIN_TEST_LOST_NODE"):
            return
        if self.how == "die":
            os._exit(9)
        raise RuntimeError(f"node {os.environ.get('NODE_RANK')} failed before the collection")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--collect-in", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--tag", default="job")
    parser.add_argument("--late-model", action="store_true", help="build the layers in configure_model")
    parser.add_argument("--test-after-fit", action="store_true")
    parser.add_argument("--pg-timeout", type=float, default=None, help="the process group's timeout, in seconds")
    parser.add_argument("--lost-before-collect", choices=["die", "raise"], default=None)
    parser.add_argument(
        "--resume-then-test-fresh",
        action="store_true",
        help="save a checkpoint, resume it on a second Trainer with fit(ckpt_path=...), then test a fresh model there",
    )
    args = parser.parse_args()

    model = (LateModel if args.late_model else Model)(tag=args.tag)
    callback = PretrainerCallback(
        collect_in=args.collect_in, loadables={"encoder": "encoder"}, default_source=args.source
    )
    strategy = args.strategy
    if args.pg_timeout is not None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=datetime.timedelta(seconds=args.pg_timeout))
    lost = [LostBeforeTheCollection(args.lost_before_collect)] if args.lost_before_collect else []
    started = time.monotonic()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_steps=2,
        callbacks=[*lost, callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=os.environ.get("PL_PRETRAIN_RECORD_DIR", "."),
    )
    try:
        trainer.fit(model)
        if args.test_after_fit:
            trainer.test(model)
        if args.resume_then_test_fresh:
            ckpt = pathlib.Path(args.collect_in).parent / "last.ckpt"
            trainer.save_checkpoint(ckpt)
            trainer = L.Trainer(
                accelerator="cpu",
                strategy=args.strategy,
                devices=args.devices,
                max_steps=4,
                callbacks=[
                    PretrainerCallback(
                        collect_in=args.collect_in, loadables={"encoder": "encoder"}, default_source=args.source
                    )
                ],
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=os.environ.get("PL_PRETRAIN_RECORD_DIR", "."),
            )
            trainer.fit(Model(tag=f"{args.tag}-resumed"), ckpt_path=ckpt)
            trainer.test(Model(tag=f"{args.tag}-fresh"))
    except PretrainerError as error:
        folder = pathlib.Path(os.environ["PL_PRETRAIN_RECORD_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"error-rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "type": type(error).__name__,
                    "text": str(error),
                    "key": error.key,
                    "rank": error.rank,
                    "seconds": time.monotonic() - started,
                }
            )
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
