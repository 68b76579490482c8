"""Where the int8 graph's depth departs from fp32: parity of partly quantised graphs.

A study for the fast-inference issue, not a benchmark of record. The report stacks (Middlebury
2005, rendered as ``bench_report_split.py`` renders them: 384 px wide, 10 slices, blur 14 px,
noise 0.01) are centre-cropped to 288x384 so that one fixed-shape graph serves all six. The
fp32 graph of ``dualfocus-s`` is exported, prepared and calibrated once by the int8 recipe
(``reconstruct.backends.quantize``); then graphs that quantise only part of what the recipe
quantises are written from the same activation ranges, and each one's normalised depth is
compared with the fp32 graph's, pixel by pixel:

* ``recipe``: everything recipe v5 quantised (the int8 graph shipped until v6, which leaves
  the stem in float: this study is what led to it);
* ``stem only`` / ``no stem``: only / all but the encoder's half-resolution stem (``no stem``
  is recipe v6);
* ``encoder only`` / ``decoder only``: the 2D encoder / the volume, 3D decoder and heads;
* with ``--one-by-one``, also each convolution alone (its input, weights and output quantised).

Prints, per variant, |depth - fp32 depth| (units of the focus range: mean, p99, max, share of
pixels within 1e-3) and the p50 latency of a 10x288x384 stack (one process, variants one after
the other: compare within one run), and writes benchmarks/results/int8_parity.json.

    python benchmarks/study_int8_parity.py [--runs 10] [--one-by-one]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, save  # noqa: E402

import numpy as np  # noqa: E402

SHAPE = (10, 288, 384)
WEIGHTS = Path(__file__).resolve().parents[1] / "reconstruct" / "weights" / "dualfocus-s.safetensors"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "middlebury_2001_2006"


def _is_stem(name: str) -> bool:
    return "/encoder/stem." in name


def _is_encoder(name: str) -> bool:
    return name.startswith("/net/encoder/")


VARIANTS = {
    "recipe": lambda n: True,
    "stem only": _is_stem,
    "no stem": lambda n: not _is_stem(n),
    "encoder only": _is_encoder,
    "decoder only": lambda n: not _is_encoder(n),
}


def report_feeds(data: Path) -> list[dict[str, np.ndarray]]:
    """The six report stacks as graph inputs: ``stack`` [1, 10, 3, 288, 384], ``focus`` [1, 10]."""
    from reconstruct.synth import REPORT_SCENES, load_middlebury, render_eval_stack

    feeds = []
    for i, scene in enumerate(load_middlebury(data, names=list(REPORT_SCENES))):
        ev = render_eval_stack(scene, width=SHAPE[2], slices=SHAPE[0], max_blur_px=14.0, noise_sigma=0.01, seed=i)
        top = (ev["stack"].shape[1] - SHAPE[1]) // 2
        st = ev["stack"][:, top:top + SHAPE[1], : SHAPE[2]].astype(np.float32) / 255.0  # [N, H, W, 3]
        feeds.append({"stack": np.ascontiguousarray(st.transpose(0, 3, 1, 2)[None]), "focus": ev["focus"].astype(np.float32)[None]})
    return feeds


def _session(path: Path):  # an onnxruntime InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _depths_and_p50(path: Path, feeds: list[dict[str, np.ndarray]], runs: int) -> tuple[list[np.ndarray], float]:
    session = _session(path)
    depths = [session.run(["depth"], f)[0] for f in feeds]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(["depth"], feeds[0])
        times.append(time.perf_counter() - t0)
    return depths, float(np.median(times)) * 1e3


def parity(depths: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """|depth - reference| over every pixel, in units of the focus range (depth is normalised)."""
    d = np.concatenate([np.abs(a - b).ravel() for a, b in zip(depths, reference, strict=True)])
    return {"mean": float(d.mean()), "p99": float(np.quantile(d, 0.99)), "max": float(d.max()), "share_within_1e-3": float((d <= 1e-3).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per variant")
    ap.add_argument("--one-by-one", action="store_true", help="also quantise each convolution alone (parity only, a few minutes)")
    args = ap.parse_args(argv)
    if not (args.data / "manifest.csv").is_file():
        print(f"skip: {args.data} not found (the Middlebury scenes live in ../shared/data)")
        return 0
    import onnx
    from onnxruntime.quantization import quantize_static

    from reconstruct.backends import quantize as q
    from reconstruct.backends.export import export_onnx

    feeds = report_feeds(args.data)
    fp32 = export_onnx(WEIGHTS, SHAPE, precision="fp32").path
    reference, fp32_ms = _depths_and_p50(fp32, feeds, args.runs)
    rows = {"fp32": {"p50_ms": fp32_ms}}
    print(f"{'variant':14s} {'nodes':>5s} {'mean':>8s} {'p99':>8s} {'max':>8s} {'<=1e-3':>7s} {'p50 ms':>7s}")
    print(f"{'fp32':14s} {'':5s} {'':8s} {'':8s} {'':8s} {'':7s} {fp32_ms:7.1f}")
    with tempfile.TemporaryDirectory(prefix="int8-parity-") as tmp:
        target, keep, float_sums_pads_slices, _quantised, _padded = q.prepare_graph(fp32, SHAPE, Path(tmp) / "prep")
        # recipe v5's float set: the current recipe's without the stem (v6 keeps the stem float)
        keep, float_sums_pads_slices = ([n for n in names if q.STEM_MARK not in n] for names in (keep, float_sums_pads_slices))
        ranges = Path(tmp) / "ranges.json"
        recipe = Path(tmp) / "recipe.onnx"
        quantize_static(str(target), str(recipe), q.feed_reader(q.calibration_feeds(SHAPE)), nodes_to_exclude=keep + float_sums_pads_slices,
                        calibration_cache_path=ranges, **q.quantiser_settings())
        model = onnx.load(str(target))
        candidates = [n.name for n in model.graph.node if n.op_type in q.QUANTISED_OPS and n.name not in set(keep + float_sums_pads_slices)]
        for name, chosen in VARIANTS.items():
            nodes = [n for n in candidates if chosen(n)]
            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            if name == "recipe":
                path = recipe
            else:
                quantize_static(str(target), str(path), None, nodes_to_quantize=nodes, calibration_cache_path=ranges, **q.quantiser_settings())
            graph = onnx.load(str(path))
            q.pads_in_uint8(graph)
            onnx.save(graph, str(path))
            depths, ms = _depths_and_p50(path, feeds, args.runs)
            rows[name] = {"nodes": len(nodes), "p50_ms": ms, **parity(depths, reference)}
            r = rows[name]
            print(f"{name:14s} {len(nodes):5d} {r['mean']:8.1e} {r['p99']:8.1e} {r['max']:8.2f} {100 * r['share_within_1e-3']:6.1f}% {ms:7.1f}", flush=True)
        if args.one_by_one:
            convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
            one_by_one = {}
            for conv in (n for n in candidates if n in convs):
                path = Path(tmp) / "one.onnx"
                quantize_static(str(target), str(path), None, nodes_to_quantize=[conv], calibration_cache_path=ranges, **q.quantiser_settings())
                session = _session(path)
                r = one_by_one[conv] = parity([session.run(["depth"], f)[0] for f in feeds], reference)
                print(f"  {conv:56s} mean {r['mean']:.1e} p99 {r['p99']:.1e} max {r['max']:.3f} within 1e-3 {100 * r['share_within_1e-3']:.1f}%", flush=True)
            rows["one by one"] = one_by_one
    path = save("int8_parity", {"what": __doc__.splitlines()[0], "machine": machine(), "shape": list(SHAPE), "recipe": q.RECIPE, "variants": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
