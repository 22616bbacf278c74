"""Benchmark lrcc's decomposition against the seed's rank-by-rank algorithm, and time a whole ResNet-18.

The seed (low_rank_conv_converter) grows the rank one at a time: for rank k = 1..r it runs
``compress_step`` GoDec iterations (QR of (W - S)·Vᵀ, V = Uᵀ(W - S), S = hard-threshold(W - U·V)),
then appends the first row of R of QR(W - U·V - S) to V: r x compress_step QR iterations in all.
lrcc starts from the truncated SVD at the full rank and runs ``compress_step`` iterations once.

Both run on the same matrix: one 512-channel 3x3 conv (ResNet-18 ``layer4.1.conv2``) read kernel-number
first, (512, 4608), rank 512 x r_ratio. ``--seed-steps N`` stops the seed after N rank steps; its total
time is then extrapolated (time per rank step grows linearly with the rank: least-squares fit) and the
errors are compared at rank N. ``--seed-layout`` also times the seed as released: its (out*k, in*k)
reshape (1536, 1536) and rank in*k*r_ratio = 384 (always extrapolated from ``--seed-steps``).
Error = ‖W - U·V - S‖ / ‖W‖ (the residual E dropped, as the seed does).

    python benchmarks/lrcc_decompose.py                       # full seed run on our layout
    python benchmarks/lrcc_decompose.py --seed-steps 16 --seed-layout
    python benchmarks/lrcc_decompose.py --weights resnet18-f37072fd.pth   # real pretrained weights
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lrcc import decompose_low_rank_sparse, model_convert_conv  # noqa: E402


@torch.no_grad()
def seed_rank_by_rank(w, rank, compress_step, lambda_s, max_steps=None, generator=None):
    """The seed's algorithm (written from its description). Returns U, V, S and per-rank-step seconds."""
    m, n = w.shape
    u = torch.randn(m, 1, generator=generator)
    v = torch.randn(1, n, generator=generator)
    step_seconds = []
    for k in range(rank if max_steps is None else min(rank, max_steps)):
        start = time.perf_counter()
        s = torch.zeros_like(w)
        for _ in range(compress_step):
            u = torch.linalg.qr((w - s) @ v.T).Q
            v = u.T @ (w - s)
            s = w - u @ v
            s[s.abs() < lambda_s] = 0
        if k < rank - 1:
            v = torch.cat([v, torch.linalg.qr(w - u @ v - s).R[:1]])
        step_seconds.append(time.perf_counter() - start)
    if v.shape[0] > u.shape[1]:  # the last appended row has not been fitted yet
        v = v[:u.shape[1]]
    return u, v, s, step_seconds


def extrapolate_seconds(step_seconds, rank):
    """Total time for ``rank`` steps from the measured ones, assuming time(k) = a + b·k (least squares)."""
    n = len(step_seconds)
    if n >= rank:
        return sum(step_seconds), False
    ks = torch.arange(1, n + 1, dtype=torch.float64)
    ts = torch.tensor(step_seconds, dtype=torch.float64)
    if n >= 2:
        b = float(((ks - ks.mean()) * (ts - ts.mean())).sum() / ((ks - ks.mean()) ** 2).sum())
    else:
        b = 0.0
    b = max(b, 0.0)
    a = float(ts.mean()) - b * float(ks.mean())
    all_ks = torch.arange(1, rank + 1, dtype=torch.float64)
    return float((a + b * all_ks).clamp_min(0).sum()), True


def relative_error(w, u, v, s):
    return float((w - u @ v - s).norm() / w.norm())


def load_resnet18(weights):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    model = resnet18()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="torchvision ResNet-18 state-dict file (default: random init, seed 0)")
    parser.add_argument("--r-ratio", type=float, default=0.25)
    parser.add_argument("--compress-step", type=int, default=50)
    parser.add_argument("--lambda-s", type=float, default=0.01)
    parser.add_argument("--seed-steps", type=int, default=None,
                        help="stop the seed algorithm after this many rank steps and extrapolate its time")
    parser.add_argument("--seed-layout", action="store_true",
                        help="also time the seed as released: (out*k, in*k) reshape and rank in*k*r_ratio")
    parser.add_argument("--repeat", type=int, default=3, help="time lrcc's decomposition as the best of N runs")
    parser.add_argument("--skip-resnet", action="store_true", help="skip timing the whole ResNet-18")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"weights: {args.weights or 'random init (torch.manual_seed(0))'}")

    model = load_resnet18(args.weights)
    weight = model.layer4[1].conv2.weight.detach().float()  # (512, 512, 3, 3)
    out_c, in_c, k, _ = weight.shape
    w = weight.reshape(out_c, -1)
    rank = int(in_c * args.r_ratio)
    steps = args.seed_steps

    ours_seconds = float("inf")
    for _ in range(args.repeat):  # best of a few: the machine is shared
        start = time.perf_counter()
        u, v, s, _ = decompose_low_rank_sparse(w[None], rank, args.compress_step, args.lambda_s)
        ours_seconds = min(ours_seconds, time.perf_counter() - start)
    ours_error = relative_error(w, u[0], v[0], s[0])

    gen = torch.Generator().manual_seed(0)
    su, sv, ss, step_seconds = seed_rank_by_rank(w, rank, args.compress_step, args.lambda_s, steps, gen)
    seed_seconds, extrapolated = extrapolate_seconds(step_seconds, rank)
    seed_error = relative_error(w, su, sv, ss)
    print(f"\nlayer4.1.conv2 as a {tuple(w.shape)} matrix, rank {rank}, compress_step {args.compress_step}, "
          f"lambda_s {args.lambda_s}")
    print(f"{'algorithm':<40}{'seconds':>12}{'rel. error':>14}")
    print(f"{'lrcc (full rank at once, best of ' + str(args.repeat) + ')':<40}{ours_seconds:>12.2f}{ours_error:>14.5f}")
    if extrapolated:
        done = len(step_seconds)
        uk, vk, sk, _ = decompose_low_rank_sparse(w[None], done, args.compress_step, args.lambda_s)
        print(f"{'seed (rank by rank)':<40}{seed_seconds:>11.1f}*{'n/a':>14}")
        print(f"* extrapolated from the first {done} of {rank} rank steps ({sum(step_seconds):.1f} s measured)")
        print(f"  error at rank {done}: seed {seed_error:.5f}, lrcc {relative_error(w, uk[0], vk[0], sk[0]):.5f}")
    else:
        print(f"{'seed (rank by rank)':<40}{seed_seconds:>12.2f}{seed_error:>14.5f}")
    print(f"speed-up: {seed_seconds / ours_seconds:.0f}x")

    if args.seed_layout:
        w_seed = weight.reshape(out_c * k, in_c * k)
        rank_seed = min(int(in_c * k * args.r_ratio), min(w_seed.shape))
        limit = steps or 8
        _, _, _, seconds = seed_rank_by_rank(w_seed, rank_seed, args.compress_step, args.lambda_s, limit, gen)
        total, _ = extrapolate_seconds(seconds, rank_seed)
        start = time.perf_counter()
        u2, v2, s2, _ = decompose_low_rank_sparse(w_seed[None], rank_seed, args.compress_step, args.lambda_s)
        ours2 = time.perf_counter() - start
        print(f"\nseed as released: {tuple(w_seed.shape)} matrix, rank {rank_seed}: seed ~{total / 60:.1f} min "
              f"(extrapolated from {len(seconds)} rank steps), lrcc {ours2:.2f} s "
              f"(error {relative_error(w_seed, u2[0], v2[0], s2[0]):.5f})")

    if not args.skip_resnet:
        start = time.perf_counter()
        model_convert_conv(model, "tune_U_S", r_ratio=args.r_ratio, compress_step=args.compress_step,
                           lambda_s=args.lambda_s, verbose=False)
        print(f"\nwhole ResNet-18 (all {sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())} convs), "
              f"r_ratio {args.r_ratio}, compress_step {args.compress_step}: "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
