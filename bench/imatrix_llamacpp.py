"""Our importance matrix against llama.cpp's own ``llama-imatrix`` tool, and our quantizer call against ``llama-quantize``.

Needs the llamacpp extra and the two tools built from the same vendored llama.cpp (not part of this
project; linking them against the extra's libllama only compiles llama.cpp's ``common`` library, about
10 minutes on 2 cores)::

    S=<llama-cpp-python sdist>/vendor/llama.cpp; L=.venv/lib/python3.11/site-packages/llama_cpp/lib
    # build-info.cpp: $S/common/build-info.cpp.in with its four @...@ fields filled in; llguidance.cpp left out
    COMMON="$(ls $S/common/*.cpp $S/common/parsers/*.cpp $S/common/jinja/*.cpp | grep -v llguidance) \\
            $S/vendor/cpp-httplib/httplib.cpp build-info.cpp"
    g++ -O1 -std=c++17 -I$S/include -I$S/ggml/include -I$S/common -I$S/vendor $COMMON $S/tools/imatrix/imatrix.cpp \\
        -L$L -Wl,-rpath,$L -lllama -lggml -lggml-base -lpthread -o llama-imatrix
    # llama-quantize likewise, with $S/tools/quantize/quantize.cpp and main.cpp instead of imatrix.cpp

On SmolLM2-135M (pretrained), for the same text (the first ``--chunks`` x ``--ctx`` tokens of the Wikipedia
train split, tokenized by llama.cpp, BOS first in each chunk as the tool does):

1. ``llama-imatrix -m <F32 export> -f train.txt -c <ctx> --chunks N`` against ``collect_imatrix`` on the same
   chunks: token counts and the per-column means, entry by entry;
2. ``llama-quantize --imatrix ours.imatrix.gguf`` against ``quantize_gguf`` given the same file: the two
   output files, byte for byte (the ctypes route writes what the tool writes);
3. each file type quantized with their imatrix and with ours, both scored by llama.cpp on the test split.

    python bench/imatrix_llamacpp.py --llama-imatrix /tmp/b/llama-imatrix --llama-quantize /tmp/b/llama-quantize
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch
from common import ROOT, machine, write_json
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from npft_lightning.quant.gguf_export import gguf_linear_names, write_gguf
from npft_lightning.quant.imatrix import collect_imatrix, read_imatrix, write_imatrix
from npft_lightning.quant.llamacpp import llamacpp_perplexity, require_llama_cpp
from npft_lightning.quant.llamacpp_quantize import quantize_gguf
from npft_lightning.tasks.gguf_plan import plan_llamacpp_files


def llama_cpp_chunks(float_file: Path, text: str, chunks: int, ctx: int) -> torch.Tensor:
    """The token chunks llama-imatrix feeds its model: llama.cpp's tokenization, cut into ``ctx`` tokens, BOS first."""
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(float_file), vocab_only=True, verbose=False)
    tokens = torch.tensor(llm.tokenize(text.encode(), add_bos=True, special=False))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    if tokens.numel() < chunks * ctx:
        raise SystemExit(f"the text holds {tokens.numel()} tokens, fewer than {chunks} x {ctx}")
    windows = tokens[: chunks * ctx].view(chunks, ctx).clone()
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        windows[:, 0] = llama_cpp.llama_vocab_bos(vocab)
    return windows


def compare_imatrices(ours, theirs) -> dict:
    """Per entry: equal token counts, and the relative difference of the per-column means (max and L2)."""
    assert set(ours.sums) == set(theirs.sums), sorted(set(ours.sums) ^ set(theirs.sums))
    a, b = ours.means(), theirs.means()
    entries = {}
    for name in sorted(a):
        diff = (a[name].double() - b[name].double()).abs()
        entries[name] = {"count_ours": ours.counts[name], "count_theirs": theirs.counts[name],
                         "max_rel": float((diff / b[name].double().abs().clamp_min(1e-30)).max()),
                         "l2_rel": float(diff.norm() / b[name].double().norm())}
    return {"entries": len(entries), "counts_equal": all(e["count_ours"] == e["count_theirs"] for e in entries.values()),
            "max_rel": max(e["max_rel"] for e in entries.values()), "max_l2_rel": max(e["l2_rel"] for e in entries.values()),
            "per_entry": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-imatrix", required=True)
    parser.add_argument("--llama-quantize", required=True)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "IQ4_XS"])
    parser.add_argument("--eval-windows", type=int, default=2, help="windows of the test split each file is scored on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="/tmp/imatrix_llamacpp")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "imatrix_llamacpp.json"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["llamacpp_types=[Q8_0]", f"gguf_out={out / 'smollm2.gguf'}", "print_config=false",
                                         f"paths.output_dir={out}", f"data.max_eval_windows={args.eval_windows}"])
    plan = plan_llamacpp_files(cfg)
    model, tokenizer = instantiate(cfg.model).load()
    model.eval()
    write_gguf(model, tokenizer, "f32", plan.float_path, plan.vocab)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    text_file = out / "train.txt"
    text_file.write_text(datamodule.corpus.text("train")[: 40 * args.chunks * args.ctx], encoding="utf-8")

    # 1. the imatrix, theirs and ours, on the same chunks
    theirs_file = out / "theirs.imatrix.gguf"
    cmd = [args.llama_imatrix, "-m", str(plan.float_path), "-f", str(text_file), "-c", str(args.ctx), "--chunks",
           str(args.chunks), "-o", str(theirs_file), "--no-ppl", "-t", str(args.threads)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, capture_output=True)
    windows = llama_cpp_chunks(plan.float_path, text_file.read_text(encoding="utf-8"), args.chunks, args.ctx)
    ours = collect_imatrix(model, windows.split(1), gguf_linear_names(model), str(text_file))
    ours_file = write_imatrix(ours, out / "ours.imatrix.gguf")
    theirs = read_imatrix(theirs_file)
    comparison = compare_imatrices(read_imatrix(ours_file), theirs)
    print(f"imatrix: {comparison['entries']} entries, counts equal: {comparison['counts_equal']}, largest relative "
          f"difference of a column's mean {comparison['max_rel']:.2e} (worst entry's L2 {comparison['max_l2_rel']:.2e})")

    # 2. and 3. the quantized files
    datamodule.setup("validate")
    test = datamodule.eval_windows("test")[: args.eval_windows]
    files = {"F32": {"ppl": llamacpp_perplexity(plan.float_path, test, n_threads=args.threads)["ppl"]}}
    for name in args.types:
        cli = out / f"cli-{name}.gguf"
        subprocess.run([args.llama_quantize, "--imatrix", str(ours_file), str(plan.float_path), str(cli), name,
                        str(args.threads)], check=True, capture_output=True)
        api = quantize_gguf(plan.float_path, out / f"api-{name}.gguf", name, imatrix=read_imatrix(ours_file),
                            imatrix_file=str(ours_file), threads=args.threads)
        with_theirs = quantize_gguf(plan.float_path, out / f"theirs-{name}.gguf", name, imatrix=theirs,
                                    imatrix_file=str(theirs_file), threads=args.threads)
        files[name] = {
            "cli_equals_api": cli.read_bytes() == Path(api["path"]).read_bytes(),
            "ppl_our_imatrix": llamacpp_perplexity(api["path"], test, n_threads=args.threads)["ppl"],
            "ppl_their_imatrix": llamacpp_perplexity(with_theirs["path"], test, n_threads=args.threads)["ppl"],
            "bits_per_weight": api["bits_per_weight"], "bits_per_weight_linears": api["bits_per_weight_linears"],
        }
        print(name, {k: v for k, v in files[name].items()}, flush=True)

    write_json(Path(args.out), {
        "what": "our imatrix vs llama.cpp's llama-imatrix on the same tokens; our quantize_gguf vs llama-quantize "
                "given the same imatrix file; files with either imatrix scored by llama.cpp",
        "model": "smollm2-135m (pretrained)", "chunks": args.chunks, "ctx": args.ctx, "text": "wiki_vital train split",
        "eval": f"{len(test)} windows of the test split x {test.shape[1]} tokens (all predictions)",
        "imatrix": {k: v for k, v in comparison.items() if k != "per_entry"}, "files": files,
        "seconds": time.perf_counter() - start, "machine": machine(),
    })


if __name__ == "__main__":
    main()
