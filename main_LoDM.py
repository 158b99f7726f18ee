"""LoDM: distribution matching on the low-rank synthetic set (each image channel stored as A·B of rank
--rank, default 2). Same code path as main_DM.py; see utils/synset.py for the parameterization.

    python main_LoDM.py --dataset CIFAR10 --ipc 10 --rank 2
"""
from main_DM import main
from utils.run import run_main

if __name__ == '__main__':
    run_main(lambda argv: main(argv, low_rank=True))
