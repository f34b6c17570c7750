"""``python distributed_cli.py PORT PROCESS_ID NUM_PROCESSES WORKDIR``: one process of a 2-process
``jax.distributed`` job on loopback (2 CPU devices each), running the command line itself:
``seggpt-jax segment --distributed`` over WORKDIR/photos into WORKDIR/dist-segment, then
``seggpt-jax finetune --distributed`` on WORKDIR/data into WORKDIR/dist-finetune, ``tune-prompt`` into
WORKDIR/dist-prompt.safetensors and ``evaluate --protocol fss1000`` on WORKDIR/fss into
WORKDIR/dist-report.json. Prints
``RESULT {"process": i, "codes": [...]}``."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    port, process_id, count, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from seggpt_jax.cli.main import main as cli

    job = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
           "--process-id", str(process_id)]
    codes = [cli(["segment", os.path.join(work, "photos"), "--prompt-image", os.path.join(work, "prompt.png"),
                  "--prompt-mask", os.path.join(work, "prompt_mask.png"), "--out-dir",
                  os.path.join(work, "dist-segment"), "--model", os.path.join(work, "model"), *job])]
    codes.append(cli(["finetune", os.path.join(work, "data"), "--out-dir", os.path.join(work, "dist-finetune"),
                      "--model", os.path.join(work, "model"), *FINETUNE, *job]))
    codes.append(cli(["tune-prompt", os.path.join(work, "data"), "-o", os.path.join(work, "dist-prompt.safetensors"),
                      "--model", os.path.join(work, "model"), *TUNE, *job]))
    codes.append(cli(["evaluate", os.path.join(work, "fss"), "-o", os.path.join(work, "dist-report.json"),
                      "--model", os.path.join(work, "model"), *EVALUATE, *job]))
    import jax

    print("RESULT " + json.dumps({"process": process_id, "codes": codes, "processes": jax.process_count()}),
          flush=True)
    jax.distributed.shutdown()


FINETUNE = ["--steps", "3", "--batch-size", "4", "--warmup-steps", "0", "--lr", "1e-3", "--checkpoint-every", "2",
            "--log-every", "1"]

TUNE = ["--steps", "2", "--batch-size", "4", "--num-prompts", "2", "--lr", "0.01"]
EVALUATE = ["--protocol", "fss1000", "--fss-split", "all", "--sampling", "all-pairs", "--seed", "1"]

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before JAX starts; not on import
    main()
