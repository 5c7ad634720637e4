# 1b pretraining under torchrun on 2 GPUs of one host (BENCHMARKS.md "Several GPUs"): DDP and FSDP2 on 1 and 2 GPUs in
# one lease, then a resume 2 → 1. Run on the GPU machine from the repo root with the wheels of .whl/ (see
# prepare_gpuin.sh for the list): OUT=/tmp/out bash benchmarks/multi_gpu_1b.sh
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "WHEELS FAILED"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
COMMON="-m moai_lib.cli train --config 1b --test --batch_size 8 --global_batch_size 16 --max_length 2048"
run() {  # name nproc strategy extra...
  local name=$1 n=$2 strat=$3; shift 3
  echo "== $(( $(date +%s) - T0 )) s: $name: torchrun --standalone --nproc_per_node $n $COMMON --distributed $strat $*"
  timeout 150 torchrun --standalone --nproc_per_node $n $COMMON --distributed $strat "$@" > $OUT/$name.log 2>&1
  echo "rc=$?"; grep -E "^step [0-9]+/|data-parallel|FSDP2:|resum|Error|error" $OUT/$name.log | grep -v "it/s" | tail -6
}
run ddp1 1 ddp --max_steps 16 --no_resume --output_dir /tmp/ddp1
run ddp2 2 ddp --max_steps 16 --no_resume --output_dir /tmp/ddp2
run fsdp1 1 fsdp2 --max_steps 16 --no_resume --output_dir /tmp/fsdp1
run fsdp2 2 fsdp2 --max_steps 12 --save_every 12 --no_resume --output_dir /tmp/fsdp2
# Resume across world sizes: same schedule (max_steps) on both sides; the 2-GPU run stops on its time budget.
run r21_2gpu 2 fsdp2 --max_steps 18 --save_every 100 --time_budget_s 10 --no_resume --output_dir /tmp/r21
run r21_1gpu 1 fsdp2 --max_steps 18 --save_every 100 --output_dir /tmp/r21
echo "== done $(( $(date +%s) - T0 )) s"
