"""One rank of the distributed tests, launched by torchrun from test_distributed.py: runs each training run of
a JSON spec in order (same process group) and, on rank 0, writes what the tests check to spec["results"].

    python -m torch.distributed.run --nproc_per_node 2 dist_worker.py spec.json
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def main(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from moai_lib.config import load_mamba_config
    from moai_lib.train import TrainParams, build_model, pretrain
    from moai_lib.train.distributed import apply_fsdp2, is_fsdp

    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    config = load_mamba_config(spec["config_dir"])
    results: dict = {}
    import time
    t0 = time.perf_counter()
    results["timings"] = {"start": t0}
    from moai_lib.train import TrainConfigError

    for run in spec["runs"]:
        run_config = load_mamba_config(run["config_dir"]) if "config_dir" in run else config
        out_dir = run["out_dir_by_rank"][dist.get_rank()] if "out_dir_by_rank" in run else run["out_dir"]
        if run.get("expect_error"):  # must fail on every rank, before training
            try:
                pretrain(TrainParams(**run["params"]), run_config, spec["data_dir"], out_dir)
            except TrainConfigError as exc:
                results[run["name"]] = {"error": str(exc)}
            else:
                results[run["name"]] = {"error": None}
            continue
        metrics = pretrain(TrainParams(**run["params"]), run_config, spec["data_dir"], out_dir,
                           stop_after_step=run.get("stop_after_step"))
        results[run["name"]] = {k: metrics[k] for k in ("history", "completed", "step", "resumed_from_step",
                                                          "num_processes", "distributed", "global_batch")}
        results["timings"][run["name"]] = time.perf_counter() - t0

    # What FSDP2 does to the model that pretrain trains.
    from torch.distributed.tensor import DTensor

    model = apply_fsdp2(build_model(config, seed=0), torch.device("cpu"), "no")
    layers = list(model.backbone.layers)
    weight = layers[0].mixer.in_proj.weight
    results["wrapping"] = {
        "root_is_fsdp": is_fsdp(model),
        "layers_are_fsdp": [is_fsdp(layer) for layer in layers],
        "all_params_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "in_proj_global_shape": list(weight.shape),
        "in_proj_local_shape": list(weight.to_local().shape),
        "world_size": dist.get_world_size(),
    }
    untied = apply_fsdp2(build_model(type(config).from_dict({**config.to_dict(), "tie_word_embeddings": False}),
                                     seed=0), torch.device("cpu"), "no")
    results["wrapping"]["embedding_group"] = {"untied": is_fsdp(untied.backbone.embedding),
                                              "tied": is_fsdp(model.backbone.embedding)}
    if dist.get_rank() == 0:
        with open(spec["results"], "w", encoding="utf-8") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
