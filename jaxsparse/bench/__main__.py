"""``python -m jaxsparse.bench {cpu,layers,gpu}``: run a benchmark suite and write its results."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxsparse.bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    cpu = sub.add_parser("cpu", help="SpMM/SDDMM on CPU vs dense XLA, jax.experimental.sparse, "
                                     "SciPy and torch.sparse")
    cpu.add_argument("--quick", action="store_true", help="a small subset (a few minutes)")
    cpu.add_argument("--reps", type=int, default=None, help="interleaved repetitions per method")
    cpu.add_argument("--dlmc-levels", nargs="+", default=None, metavar="SPARSITY",
                     help="DLMC magnitude_pruning levels to run (default: all four)")
    cpu.add_argument("--out", default="benchmarks/results", help="output directory")
    cpu.add_argument("--name", default="cpu", help="base name of the result files")
    layers = sub.add_parser("layers", help="sparse MLP block and sparse attention vs their dense "
                                           "Flax/JAX twins (CPU)")
    layers.add_argument("--reps", type=int, default=None, help="interleaved repetitions per method")
    layers.add_argument("--out", default="benchmarks/results", help="output directory")
    layers.add_argument("--name", default="layers", help="base name of the result files")
    gpu = sub.add_parser("gpu", help="the Pallas kernels on a GPU vs cuBLAS dense, "
                                     "jax.experimental.sparse and dense attention")
    gpu.add_argument("--smoke", action="store_true",
                     help="tiny sizes in Pallas interpret mode (runs on CPU; checks the script)")
    gpu.add_argument("--repeats", type=int, default=None)
    gpu.add_argument("--out", default="benchmarks/results", help="output directory")
    gpu.add_argument("--only", choices=["spmm", "sddmm", "attention"], action="append")
    args = parser.parse_args(argv)
    if args.suite == "cpu":
        from jaxsparse.bench import cpu as suite
    elif args.suite == "layers":
        from jaxsparse.bench import layers as suite
    else:
        from jaxsparse.pallas import benchmark as suite
    suite.main(args)


if __name__ == "__main__":
    main()
