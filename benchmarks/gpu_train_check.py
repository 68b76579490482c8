"""The GPU training check: the training recipe run for real on a CUDA machine, in a few minutes.

    python benchmarks/gpu_train_check.py [--config configs/train_dualfocus_paper.yaml]
        [--data ../shared/data/middlebury_2001_2006] [--minutes 3] [--resume-minutes 1]
        [--precision bf16] [--device cuda] [--work DIR] [--no-report]

What it does, in order, each step timed and written to the JSON as it ends (so a run cut short
still reports what it reached):

1. measures training steps per second of the config's model on the device (synthetic batches of
   the largest training crop, 8 slices; forward, losses, backward, optimiser), to size the run:
   ``steps`` is set so that the learning-rate schedule fills ``fill x (minutes + resume_minutes)``
   at the probe's rate (the real loop, with its data and validation, ran at 0.8x the probe's rate
   on an H100);
2. trains with the real command line under ``torchrun --standalone --nproc-per-node 1`` (NCCL on a
   GPU, gloo on the CPU) with ``max_minutes = --minutes``: pool rendering, validation on the
   tuning split, checkpoints, the best weights and their card;
3. resumes that run (``--resume``, ``max_minutes = --resume-minutes``) to the end of its schedule:
   the checkpoint written on the GPU must load and go on from its step;
4. unless ``--no-report``, scores the best weights once on the report split with
   ``benchmarks/bench_report_split.py`` (fp32 on the CPU, as the README's table).

The run's work folder (default: a temporary one) holds the derived config, the logs, the
checkpoint and the weights. Writes ``$OUT/gpu_train_check.json`` when ``$OUT`` is set (and
copies the logs and the model card there; the derived config is in the JSON), else ``benchmarks/results/gpu_train_check.json``.
Exit 0 when every step ran and the resume went on from the checkpoint's step, 1 otherwise.
The 27M-parameter weights (about 110 MB) are not copied out: the figures are the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine  # noqa: E402

logger = logging.getLogger("gpu_train_check")

DATA = ROOT.parent / "shared" / "data" / "middlebury_2001_2006"
PROBE_SLICES = 8


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "train_dualfocus_paper.yaml")
    ap.add_argument("--data", type=Path, default=DATA, help="Middlebury-layout RGB-D folder (the training and tuning scenes)")
    ap.add_argument("--minutes", type=float, default=3.0, help="max_minutes of the first invocation")
    ap.add_argument("--resume-minutes", type=float, default=1.0, help="max_minutes of the resumed invocation")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--pool-size", type=int, default=2000, help="stacks rendered per refresh")
    ap.add_argument("--render-workers", type=int, default=0, help="0: logical CPUs - 2")
    ap.add_argument("--fill", type=float, default=0.8,
                    help="share of minutes + resume-minutes the schedule is sized to fill at the probe's rate")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--no-report", action="store_true", help="skip the report-split score")
    return ap.parse_args(argv)


class _Report:
    """The JSON document, rewritten after every step."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.dir = Path(out) if out else ROOT / "benchmarks" / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "gpu_train_check.json"
        self.doc: dict[str, Any] = {"machine": machine(), "steps": {}, "ok": False}

    def step(self, name: str, **fields: Any) -> None:
        self.doc["steps"][name] = fields
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.doc, indent=2, default=str))

    def copy(self, src: Path, name: str) -> None:
        if src.exists() and os.environ.get("OUT"):
            shutil.copyfile(src, self.dir / name)


def probe_steps_per_s(model_name: str, *, crop_px: int, batch: int, precision: str, device: str, overrides: dict[str, Any]) -> float:
    """Training steps per second on synthetic batches ``[batch, 8, 3, crop, crop]`` (no data loading)."""
    import torch

    from reconstruct.dualfocus.losses import LossWeights, total_loss
    from reconstruct.dualfocus.model import DualFocusNet
    from reconstruct.dualfocus.registry import build_model
    from reconstruct.train import _as_float32

    dev = torch.device(device)
    model = build_model(model_name, **overrides).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, PROBE_SLICES, 3, crop_px, crop_px, generator=g).to(dev)
    f = torch.linspace(0.3, 1.5, PROBE_SLICES).repeat(batch, 1).to(dev)
    t = torch.rand(batch, crop_px, crop_px, generator=g).to(dev)
    m = torch.ones(batch, crop_px, crop_px, device=dev)
    weights = LossWeights(lambda_sv=0.1, lambda_fv=1.0, tau=0.05, beta=0.05)

    def one() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, f)
        out = _as_float32(out)
        loss, _ = total_loss(out, DualFocusNet.normalise_focus(f)[1], t, m, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < 5.0:
        one()
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _train(cmd: list[str], log: Path, timeout_s: float) -> tuple[int, float]:
    t0 = time.monotonic()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - t0


def _state(work: Path) -> dict[str, Any]:
    """The training state the checkpoint holds (step, best step, history)."""
    from safetensors import safe_open

    with safe_open(str(work / "last.safetensors"), framework="pt") as fh:
        return json.loads((fh.metadata() or {})["state"])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch
    import yaml

    from reconstruct.train import load_train_config

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda, but torch {torch.__version__} sees no CUDA GPU; run it on a GPU machine or pass --device cpu",
              file=sys.stderr)
        return 2
    rep = _Report()
    cfg = load_train_config(args.config)
    if args.device == "cuda":
        rep.doc["gpu"] = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version()}
    rep.doc["config"] = str(args.config)
    rep.doc["model"] = cfg.model
    crop = max(cfg.data.crop_px or (96, 112, 128))

    t0 = time.monotonic()
    rate = probe_steps_per_s(cfg.model, crop_px=crop, batch=cfg.optim.batch_size, precision=args.precision,
                             device=args.device, overrides=cfg.model_overrides)
    rep.step("probe", steps_per_s=round(rate, 2), crop_px=crop, batch=cfg.optim.batch_size, slices=PROBE_SLICES,
             precision=args.precision, wall_s=round(time.monotonic() - t0, 1))
    logger.info("probe: %.2f training steps/s (batch %d, %d px, %s)", rate, cfg.optim.batch_size, crop, args.precision)
    if args.device == "cuda":
        torch.cuda.empty_cache()

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_train_check_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = max(20, int(rate * 60 * (args.minutes + args.resume_minutes) * args.fill))
    raw = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    raw.update(out_dir=str(work.resolve()), device=args.device, precision=args.precision, max_minutes=args.minutes)
    raw["data"].update(rgbd_root=str(args.data.resolve()), pool_size=args.pool_size, refresh_every_epochs=0,
                       render_workers=args.render_workers or max(1, (os.cpu_count() or 4) - 2))
    raw["optim"].update(steps=steps, warmup_steps=min(raw["optim"].get("warmup_steps", 200), steps // 10),
                        steps_per_epoch=max(1, steps // 6))
    derived = work / "train.yaml"
    derived.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    rep.doc["derived_config"] = raw
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "reconstruct.train", "--config", str(derived), "--no-progress"]

    budget_s = 60 * args.minutes + 120  # start-up, pool rendering and the last validation come on top of max_minutes
    rc, wall = _train(torchrun, work / "train.log", budget_s)
    rep.copy(work / "train.log", "train.log")
    first = _state(work) if (work / "last.safetensors").exists() else {}
    rep.step("train", rc=rc, wall_s=round(wall, 1), steps_planned=steps, steps_done=first.get("step"),
             best_step=first.get("best_step"), best_tuning=first.get("best_metrics"))
    if rc != 0 or not first:
        return 1

    raw["max_minutes"] = args.resume_minutes
    derived.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    rc, wall = _train(torchrun + ["--resume"], work / "resume.log", 60 * args.resume_minutes + 120)
    rep.copy(work / "resume.log", "resume.log")
    second = _state(work)
    if first["step"] >= steps:
        logger.error("the first invocation finished the whole schedule (%d steps) inside --minutes, so the resume had "
                     "nothing to go on with: raise --fill or lower --minutes", steps)
    went_on = second.get("step", 0) > first["step"]
    history = second.get("history") or []
    rep.step("resume", rc=rc, wall_s=round(wall, 1), from_step=first["step"], steps_done=second.get("step"), went_on=went_on,
             best_step=second.get("best_step"), best_tuning=second.get("best_metrics"),
             trained_wall_min=round(float(second.get("wall_s", 0)) / 60, 2), history=history)
    name = raw.get("name") or cfg.model
    rep.copy(work / f"{name}.yaml", "model_card.yaml")
    ok = rc == 0 and went_on

    if not args.no_report:
        env = dict(os.environ, DUALFOCUS_BENCH_RESULTS=str(work))
        t0 = time.monotonic()
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_report_split.py"), "--data", str(args.data),
               "--weights", str(work / f"{name}.safetensors"), "--out", "report_split_gpu_trained"]
        with (work / "report.log").open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        rep.copy(work / "report.log", "report.log")
        doc = json.loads((work / "report_split_gpu_trained.json").read_text()) if rc == 0 else None
        rep.step("report_split", rc=rc, wall_s=round(time.monotonic() - t0, 1), result=doc)
        ok = ok and rc == 0
    rep.doc["ok"] = ok
    rep.save()
    print(json.dumps({k: v for k, v in rep.doc["steps"].items() if k != "report_split"}, indent=1, default=str)[:4000])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
