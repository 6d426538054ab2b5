"""Single-process worker: the train / evaluate / export commands against bad inputs, in order.

Each scenario calls a command's ``main(argv)`` in this process (the code path of ``python -m
megatron_tempnet.train``: cli.run_command) with its stdout / stderr captured, and records the
exit code, the "error:" lines, the log and digests of the checkpoint directories before and
after (nothing already written may change). One process for every scenario: megatron-core is
imported once. Results: a JSON file (argv[4]).

Usage: reliability_worker.py <data prefix> <tokenizer model> <work dir> <result.json>
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))
from reliability import error_lines  # noqa: E402
DATA, TOKENIZER, WORK, RESULT = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
CHECKPOINT_STATE = ("latest_checkpointed_iteration.txt", "lineage.json")  # + every iter_*/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(*extra, iters=4):
    return ["--model", "tiny-gpt", "--data-path", DATA, "--tokenizer-type", "sentencepiece",
            "--tokenizer-model", TOKENIZER, "--split", "99,1,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval", "1",
            "--eval-iters", "0", "--train-iters", str(iters), *extra]


def digest(root) -> str:
    """Every checkpoint file under ``root`` (name, bytes, mtime): any change shows."""
    root, h = Path(root), hashlib.sha256()
    if not root.exists():
        return "absent"
    files = [p for p in sorted(root.rglob("*")) if p.is_file()
             and (p.relative_to(root).parts[0].startswith("iter_") or p.name in CHECKPOINT_STATE)]
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def command(main, argv) -> dict:
    os.environ["MASTER_PORT"] = str(free_port())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    err_text = err.getvalue()
    return {"code": code, "errors": error_lines(err_text),
            "traceback": "Traceback" in err_text + out.getvalue(), "out": out.getvalue()[-3000:],
            "err": err_text[-3000:]}


def train(*argv, **kw):
    from megatron_tempnet.train import main

    return command(main, flags(*argv, **kw))


def evaluate(*argv):
    from megatron_tempnet.evaluate import command as main

    return command(main, flags(*argv))


def export(load, output):
    import convert_checkpoint_to_hf

    return command(convert_checkpoint_to_hf.main, ["--load", str(load), "--output", str(output),
                                                   "--tokenizer-model", TOKENIZER])


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if how == "zeros":
        data[middle:middle + 4096] = bytes(min(4096, len(data) - middle))
    else:
        data[middle:middle + 64] = os.urandom(min(64, len(data) - middle))
    path.write_bytes(bytes(data))


def main():
    S, T, U, W = (WORK / n for n in ("S", "T", "U", "W"))
    keep = "--use-checkpoint-opt-param-scheduler"
    r = {}

    def case(name, result, *dirs):
        result["unchanged"] = all(digest(d) == before[str(d)] for d in dirs)
        r[name] = result

    r["fresh"] = train("--save", str(S), "--save-interval", "2")
    r["fresh_status"] = json.loads((S / "exit_status.json").read_text())
    before = {str(S): digest(S)}

    # 1. checkpoints destroyed with exit 0
    status_before = (S / "exit_status.json").read_bytes()
    case("second_fresh_run", train("--save", str(S)), S)  # another run's directory: its exit
    r["second_fresh_run"]["status_kept"] = (S / "exit_status.json").read_bytes() == status_before
    marker = S / "latest_checkpointed_iteration.txt"
    marker.rename(S / "marker.bak")
    before[str(S)] = digest(S)
    case("marker_lost", train("--save", str(S), "--load", str(S), keep, iters=6), S)
    (S / "marker.bak").rename(marker)
    before[str(S)] = digest(S)
    case("finetune_into_owned_dir", train("--save", str(S), "--load", str(S), "--finetune"), S)
    r["other_run"] = train("--save", str(T), iters=2)
    before[str(T)] = digest(T)
    status_before = (T / "exit_status.json").read_bytes()
    case("resume_into_other_runs_dir", train("--save", str(T), "--load", str(S), keep, iters=6),
         S, T)
    r["resume_into_other_runs_dir"]["status_kept"] = \
        (T / "exit_status.json").read_bytes() == status_before
    foreign = S / "iter_0000006"
    shutil.copytree(S / "iter_0000002", foreign)
    (foreign / "writer.json").unlink()
    before[str(S)], foreign_digest = digest(S), digest(foreign)
    case("save_over_foreign_dir", train("--save", str(S), "--load", str(S), keep,
                                        "--save-interval", "2", iters=6))
    r["save_over_foreign_dir"]["foreign_kept"] = digest(foreign) == foreign_digest
    r["save_over_foreign_dir"]["latest"] = marker.read_text().strip()
    foreign.rename(S / "iter_0000001")  # now older than the current one: keep-last's business
    r["keep_last_spares_foreign"] = train("--save", str(S), "--load", str(S), keep,
                                          "--save-interval", "2", "--keep-last", "1", iters=6)
    r["keep_last_spares_foreign"]["dirs"] = sorted(p.name for p in S.glob("iter_*"))
    before[str(S)] = digest(S)

    # 4. flags silently ignored on resume
    case("finetune_without_load", train("--save", str(WORK / "F1"), "--finetune"))
    case("frozen_lm_without_checkpoint", train(
        "--save", str(WORK / "F2"), "--tempnet-loss-mode", "tempnet_ce",
        "--tempnet-training-mode", "frozen_lm"))
    case("lr_changed_on_resume", train("--save", str(S), "--load", str(S), "--lr", "1e-3",
                                       iters=6), S)
    case("seq_length_changed_on_resume", train("--save", str(S), "--load", str(S),
                                               "--seq-length", "16", keep, iters=8), S)
    case("seed_changed_on_resume", train("--save", str(S), "--load", str(S), "--seed", "7",
                                         keep, iters=8), S)
    case("override_schedule", train("--save", str(S), "--load", str(S), "--lr", "1e-3",
                                    "--lr-decay-style", "constant",
                                    "--override-opt-param-scheduler", iters=7))
    before[str(S)] = digest(S)
    tempnet = ("--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "2.0",
               "--tempnet-hidden-size", "16")
    r["tempnet_run"] = train("--save", str(U), *tempnet, iters=2)
    before[str(U)] = digest(U)
    case("tau_bounds_changed_on_resume", train("--save", str(U), "--load", str(U), *tempnet,
                                               "--tempnet-tau-min", "0.2", iters=3), U)
    case("tau_bounds_changed_in_evaluation", evaluate("--load", str(U), *tempnet,
                                                      "--tempnet-tau-min", "0.2"), U)
    r["batch_size_changed_on_resume"] = train("--save", str(U), "--load", str(U), *tempnet,
                                              "--global-batch-size", "8", keep, iters=3)

    # 2. corruption, detected by train, evaluate and export
    latest = S / f"iter_{int(marker.read_text()):07d}"
    shard = sorted(latest.glob("*.distcp"))[0]
    corrupt(shard, "zeros")
    before[str(S)] = digest(S)
    case("zeroed_shard_train", train("--save", str(S), "--load", str(S), keep, iters=9), S)
    case("zeroed_shard_evaluate", evaluate("--load", str(S)), S)
    case("zeroed_shard_export", export(S, WORK / "hf"), S)
    r["zeroed_shard_export"]["output_absent"] = not (WORK / "hf").exists()
    r["zeroed_shard_file"] = shard.name
    corrupt(latest / "common.pt", "random")
    before[str(S)] = digest(S)
    case("random_bytes_train", train("--save", str(S), "--load", str(S), keep, iters=9), S)

    case("zeroed_shard_finetune", train("--save", str(WORK / "F4"), "--load", str(S),
                                        "--finetune", iters=2), S)
    r["zeroed_shard_finetune"]["save_absent"] = not (WORK / "F4" / "iter_0000002").exists()

    # 5. rough error paths: one line, before any process group or dataset index
    cache = WORK / "cache_layout"
    case("train_iters_zero", train("--save", str(S), "--load", str(S), iters=0), S)
    case("seq_length_beyond_positions", train("--seq-length", "512", "--data-cache-path",
                                              str(cache)))
    case("tp_not_dividing_the_world", train("--tensor-model-parallel-size", "3",
                                            "--data-cache-path", str(cache)))
    r["tp_not_dividing_the_world"]["no_index_built"] = not cache.exists()
    blend = flags()
    blend[blend.index("--data-path") + 1:blend.index("--data-path") + 2] = ["nan", DATA]
    from megatron_tempnet.train import main as train_main
    case("nan_blend_weight", command(train_main, blend))
    case("finetune_mode_without_checkpoint", train(
        "--save", str(WORK / "F5"), "--tempnet-loss-mode", "tempnet_dro", "--tempnet-rho", "2",
        "--tempnet-training-mode", "finetune"))

    # the opt-out: no checksums written, none verified (a zeroed shard loads)
    X = WORK / "X"
    r["no_checksums"] = train("--save", str(X), "--no-checkpoint-checksums", iters=2)
    r["no_checksums"]["manifests"] = sorted(p.parent.name for p in X.rglob("checksums.json"))
    corrupt(sorted((X / "iter_0000002").glob("*.distcp"))[0], "zeros")
    r["no_checksums_resume"] = train("--save", str(X), "--load", str(X), keep,
                                     "--no-checkpoint-checksums", iters=3)

    # 6. exit codes in exit_status.json
    r["time_limit"] = train("--save", str(W), "--exit-duration-in-mins", "1e-6", iters=6)
    r["time_limit_status"] = json.loads((W / "exit_status.json").read_text())

    # 5. a disk that fills during a save (root: a small tmpfs; else skipped)
    D = WORK / "D"
    D.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(D)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            full = train("--save", str(D), "--save-interval", "2", iters=6)
            full["latest"] = (D / "latest_checkpointed_iteration.txt").read_text().strip() \
                if (D / "latest_checkpointed_iteration.txt").exists() else None
            r["disk_full"] = full
        finally:
            subprocess.run(["umount", "-l", str(D)])
    with open(RESULT, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
