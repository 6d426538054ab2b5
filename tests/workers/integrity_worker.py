"""torchrun worker (2 processes, gloo): checkpoint checksums split across ranks.

  1. rank 0 writes a checkpoint directory of random files; write_manifest on both ranks, with
     the files each rank hashed recorded (the split: disjoint, covering, both ranks busy)
  2. verify_manifest on both ranks: "verified"
  3. rank 0 corrupts one file of rank 1's share only: both ranks raise the same error
  4. restore it, delete one file of rank 0's share: both ranks raise the same error
Usage: integrity_worker.py <checkpoint dir> <seed>
"""
import random
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_tempnet.training import integrity
from torchrun import save_rank_result


def attempt(path) -> str:
    try:
        return integrity.verify_manifest(path)
    except integrity.CorruptCheckpointError as e:
        return f"raised: {e}"


def main():
    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rng = random.Random(seed)
    names = [f"__{r}_{i}.distcp" for r in range(2) for i in range(3)] + ["common.pt",
                                                                         "sub/metadata.json"]
    if rank == 0:
        (path / "sub").mkdir(parents=True)
        for name in names:
            (path / name).write_bytes(rng.randbytes(rng.randrange(1, 3 << 20)))
    dist.barrier()

    hashed = []
    real_digest = integrity.file_digest

    def recording(file, algorithm=integrity.ALGORITHM):
        hashed.append(Path(file).relative_to(path).as_posix())
        return real_digest(file, algorithm)

    integrity.file_digest = recording
    manifest = integrity.write_manifest(path)
    integrity.file_digest = real_digest
    result = {"manifest": manifest, "hashed": sorted(hashed), "verified": attempt(path)}

    files = sorted(integrity.checkpoint_files(path))
    shares = integrity.split_files([(path / f).stat().st_size for f in files], 2)
    victim1, victim0 = files[shares[1][0]], files[shares[0][-1]]
    original = (path / victim1).read_bytes()
    dist.barrier()
    if rank == 0:
        with open(path / victim1, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes(b ^ 0xFF for b in original[len(original) // 2:][:64]))
    dist.barrier()
    result["corrupt_rank1_share"] = (victim1, attempt(path))
    dist.barrier()
    if rank == 0:
        (path / victim1).write_bytes(original)
        (path / victim0).unlink()
    dist.barrier()
    result["missing_rank0_share"] = (victim0, attempt(path))
    save_rank_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
