"""LoDC / LoDSA: gradient matching on the low-rank synthetic set (each image channel stored as A·B of rank
--rank, default 2). Same code path as main_DC.py, loops from the budget --ipc; see utils/synset.py.

    python main_LoDC.py --dataset CIFAR10 --ipc 1 --rank 2
    python main_LoDC.py --method DSA --dataset CIFAR100 --ipc 10 --rank 8
"""
from main_DC import main
from utils.run import run_main

if __name__ == '__main__':
    run_main(lambda argv: main(argv, low_rank=True))
