"""LoMTT: trajectory matching on the low-rank synthetic set (each image channel stored as A·B of rank
--rank, default 2); A·B is computed once per iteration, before the student's unroll. Same code path as
main_MTT.py, with the plugin's defaults (noise init, lr_lr 1e-7, syn_steps 50, expert_epochs 2,
max_start_epoch 5). The plugin evaluated LoMTT with every batch standardized: --standardize_eval.

    python main_LoMTT.py --config configs/CIFAR10/LoMTT_ipc1.json
"""
from main_MTT import main
from utils.run import run_main

if __name__ == '__main__':
    run_main(lambda argv: main(argv, low_rank=True))
