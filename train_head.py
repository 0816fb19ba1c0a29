"""
Train the DSC correction head on the frozen base's own mistakes.

    python train_head.py             # FCA head -> out/head.pt (CPU default: 6-10 minutes)
    python train_head.py --no-fca    # the ablation: drafts made and judged in one context
    python train_head.py --overwrite # replace an existing head (Ctrl-C or SIGTERM: exit 130, nothing saved)
    torchrun --nproc_per_node=2 train_head.py   # DistributedDataParallel over the head

The base (out/base.pt) is frozen: no gradients, eval mode, every forward pass
under torch.no_grad. Each step makes fresh FCA drafts (corrector.fca_drafts:
t over nearly the whole time range, each draft judged against a valid response
its canvas's ground truth allows) and trains only the head, with the rare
'wrong' class weighted up. At the end the head reports, on validation data,
its AUROC, the positive rate and precision/recall at tau on FCA drafts and on
the canvases the sampler writes at 4 tokens per step (mid-decoding, by how much
is still masked, and finished); tau is picked on validation problems by
decoding accuracy at 4 tokens per step.
"""

import os
import signal

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load (seconds): exit 130, no traceback
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda *_: (os.write(2, b"interrupted\n"), os._exit(130)))

import argparse
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from cli import check_flags, seed
from common import (CheckpointError, check_fits, check_output_path, finish_distributed, interruptible, load_model,
                    lr_at, model_fingerprint, parameter_count, peak_flops, pick_device, save_checkpoint,
                    setup_distributed)
from corrector import CorrectionHead, HeadConfig, balanced_bce, fca_drafts
from remasking import HeadRemask
from sample import FixedSchedule, decode_problems, generate_fast


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="out/base.pt", help="the frozen base checkpoint")
    p.add_argument("--out", default=None,
                   help="head checkpoint (default: out/head.pt, or out/head_nofca.pt with --no-fca)")
    p.add_argument("--no-fca", action="store_true",
                   help="train the ablation: drafts made in the context they are judged in")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--width", type=int, default=64, help="head width")
    p.add_argument("--n-layer", type=int, default=2, help="head transformer blocks")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-iters", type=int, default=900)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--draft-tokens", type=int, default=16,
                   help="tokens drafted at once per example: the trained base rarely errs with fewer")
    p.add_argument("--fca-dt", type=float, default=1 / 32,
                   help="FCA's dt: t is drawn in [0, 1 - dt), so the head sees canvases up to 1 - dt masked")
    p.add_argument("--labels", choices=("closest", "x0"), default="closest",
                   help="a draft is wrong against a valid response the canvas's ground truth allows, or against "
                        "the one response the row was drawn with (x0)")
    p.add_argument("--draft-from", choices=("masked", "extra"), default="masked",
                   help="draft among every masked position of x_{t+t'}, or only those x_t shows (FCA)")
    p.add_argument("--loss", choices=("balanced", "plain"), default="balanced",
                   help="balanced BCE on the drafts, or plain BCE on every revealed response token")
    p.add_argument("--taus", default="0.05,0.1,0.2,0.3,0.4,0.5,0.7,0.9,0.95,0.99",
                   help="remask thresholds tried on validation")
    p.add_argument("--val-problems", type=int, default=64, help="validation problems per task for picking tau")
    p.add_argument("--seed", type=seed, default=1, help="head init and drafts")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds a trained head")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    return p.parse_args(argv)


def numbers(text, kind):
    """The comma-separated numbers of a flag, or [] if any is not a number of that kind."""
    try:
        return [kind(t) for t in text.split(",")]
    except ValueError:
        return []


def check_args(args):
    """Every flag, before any work (the ones read after training too): ValueError or
    CheckpointError naming the first that cannot work."""
    taus = numbers(args.taus, float)
    check_flags(args, [("--width", args.width >= 1 and args.width % HeadConfig.n_head == 0,
                        f"a positive multiple of the head's {HeadConfig.n_head} attention heads"),
                       ("--n-layer", args.n_layer >= 1, "at least 1"),
                       ("--draft-tokens", 1 <= args.draft_tokens <= data.GEN_LEN, f"between 1 and {data.GEN_LEN}"),
                       ("--fca-dt", 0 < args.fca_dt < 1, "between 0 and 1"),
                       ("--draft-from", args.draft_from == "masked" or not args.no_fca,
                        "masked with --no-fca, which masks no extra positions"),
                       ("--taus", taus and all(0 <= t <= 1 for t in taus), "comma-separated numbers between 0 and 1"),
                       ("--val-problems", args.val_problems >= 1, "at least 1")])
    for task in data.TASKS:  # ValueError now, not after training, if the split is too small
        data.fixed_problems(task, "val", args.val_problems)
    config = HeadConfig(width=args.width, n_layer=args.n_layer)  # the base's width is checked when it loads
    check_fits(parameter_count(CorrectionHead, config), pick_device(args.device), 16, "--width and --n-layer")
    check_output_path(args.out, "head", inputs={"--base": args.base}, replace=args.overwrite)


def auroc(scores, labels):
    """Area under the ROC curve: P(a wrong token scores above a right one), ties counted half."""
    pos, neg = scores[labels.bool()].double(), scores[~labels.bool()].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    above = (pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean()
    return above.item()


@torch.no_grad()
def detection_metrics(base, head, enc, tau, ctx, args, batches=8, batch_size=128):
    """AUROC, positive rate, precision and recall at tau on held-out (validation) drafts."""
    rng = random.Random(0)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    scores, labels = [], []
    device = next(base.parameters()).device
    for x0, refs in (b for _ in range(batches) for b in data.get_batch_with_references(enc, batch_size, rng, "val")):
        with ctx:
            hidden, wrong, drafted, _ = fca_drafts(base, x0.to(device), x0.shape[1] - data.GEN_LEN, args.draft_tokens,
                                                   args.fca_dt, not args.no_fca, references=labels_from(refs, args),
                                                   extra_only=args.draft_from == "extra")
            p_wrong = torch.sigmoid(head(hidden).float())
        scores.append(p_wrong[drafted].cpu())
        labels.append(wrong[drafted].cpu())
    torch.set_rng_state(state)
    return detection_figures(torch.cat(scores), torch.cat(labels), tau)


def labels_from(references, args):
    """What fca_drafts labels against: every valid response (--labels closest) or x0 alone (None)."""
    return references.to(args.device) if args.labels == "closest" else None


def detection_figures(scores, wrong, tau):
    """AUROC, the rate of wrong tokens, precision and recall of 'P(wrong) > tau'."""
    flagged = scores > tau
    return {"auroc": auroc(scores, wrong), "positive_rate": wrong.float().mean().item(),
            "precision": (flagged & wrong).sum().item() / max(1, flagged.sum().item()),
            "recall": (flagged & wrong).sum().item() / max(1, wrong.sum().item()), "drafts": len(wrong)}


@torch.no_grad()
def decoding_detection(base, head, enc, tau, ctx, n=64, tokens_per_step=4):
    """The same figures on the canvases the head judges while decoding: held-out
    problems decoded by the base alone at tokens_per_step, the head scoring the
    revealed tokens of every step's pre-reveal canvas, split by how much of the
    response is still masked, and the finished canvas. A token is wrong where it
    differs from the valid response closest to its finished row (none is, when the
    verifier accepts it): without send-backs a revealed token never changes."""
    device, mask_id = next(base.parameters()).device, base.config.mask_id
    bins = {"over half masked": (0.5, 1.0), "a quarter to half masked": (0.25, 0.5),
            "under a quarter masked": (0, 0.25)}
    scores, labels = {name: [] for name in [*bins, "finished"]}, {name: [] for name in [*bins, "finished"]}
    for task in data.TASKS:  # one task per batch: its prompts share a width
        problems = data.fixed_problems(task, "val", n)
        prompts = data.encode_prompts(enc, [p.prompt for p in problems]).to(device)
        canvases = []
        with ctx:
            out, _ = generate_fast(base, prompts, FixedSchedule(data.GEN_LEN // tokens_per_step), eos_id=enc.eos,
                                   on_step=lambda before, after, sent_back, active: canvases.append((before, active)))
        drafts = out[:, -data.GEN_LEN:].cpu()
        right = data.score(problems, [data.decode_response(enc, row.tolist()) for row in drafts])
        wrong = torch.stack([wrong_tokens(enc, p, row, ok) for row, p, ok in zip(drafts, problems, right)])
        for canvas, active in canvases + [(out, torch.ones(len(out), dtype=torch.bool, device=device))]:
            with ctx:
                p_wrong = torch.sigmoid(head(base(canvas, return_hidden=True)[1]).float())[:, -data.GEN_LEN:].cpu()
            response = canvas[:, -data.GEN_LEN:].cpu()
            judged = (response != mask_id) & active.cpu()[:, None]
            masked = (response == mask_id).float().mean(1, keepdim=True).expand_as(response)
            where = {"finished": judged} if canvas is out else \
                {name: judged & (masked > lo) & (masked <= hi) for name, (lo, hi) in bins.items()}
            for name, w in where.items():
                scores[name].append(p_wrong[w])
                labels[name].append(wrong[w])
    return {name: detection_figures(torch.cat(scores[name]), torch.cat(labels[name]), tau) for name in scores}


def wrong_tokens(enc, problem, row, accepted):
    """(GEN_LEN,) bool: where a decoded response differs from the valid response
    closest to it (fewest differing tokens); nothing when the verifier accepted it."""
    if accepted:
        return torch.zeros_like(row, dtype=torch.bool)
    refs = torch.tensor([data.encode_response(enc, r) for r in problem.responses])
    return refs[(refs != row).sum(1).argmin()] != row


def pick_remasking(base, head, enc, taus, n, ctx):
    """The remasking policy (remasking.HeadRemask) whose tau gives the best validation
    accuracy at 4 tokens per step (ties: the higher tau). Returns (policy, accuracy by tau)."""
    problems = [p for t in data.TASKS for p in data.fixed_problems(t, "val", n)]
    results = {}
    for tau in taus:
        with ctx:
            responses, _ = decode_problems(base, enc, problems, FixedSchedule(data.GEN_LEN // 4),
                                           policy=HeadRemask(head, tau))
        results[tau] = sum(data.score(problems, responses)) / len(problems)
    return HeadRemask(head, max(results, key=lambda tau: (results[tau], tau))), results


def main(argv=None):
    args = get_args(argv)
    if args.out is None:
        args.out = "out/head_nofca.pt" if args.no_fca else "out/head.pt"
    try:
        pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: --device: {e}")
    try:
        check_args(args)
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    rank, local_rank, world, args.device = setup_distributed(args.device)  # torchrun: one rank per device
    master = rank == 0
    cuda = args.device.startswith("cuda")
    torch.manual_seed(args.seed)  # the same initial head on every rank
    rng = random.Random(args.seed + rank)  # each rank its own data stream
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    enc = data.get_tokenizer()
    try:
        base, _ = load_model(args.base, data.tokenizer_id(enc))
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    base = base.to(args.device).requires_grad_(False).eval()  # frozen: DSC stage 2 never updates it
    fingerprint = model_fingerprint(base)
    config = HeadConfig(n_embd_in=base.config.n_embd, width=args.width, n_layer=args.n_layer)
    head = CorrectionHead(config).to(args.device)
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01, fused=cuda)
    train_step_head = head
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_step_head = DDP(head, device_ids=[local_rank] if cuda else None)
    drafts_base = torch.compile(base, dynamic=False) if cuda and not args.no_compile else base

    peak, peak_name = peak_flops(args.device)
    # per step: two base forward passes (2N FLOPs/token each) and the head's forward+backward (6N)
    tokens_per_step = sum(x.numel() for x in data.get_batch(enc, args.batch_size, random.Random(0)))
    flops_per_step = tokens_per_step * (4 * base.num_params() + 6 * sum(p.numel() for p in head.parameters()))
    if master:
        print(f"head {sum(p.numel() for p in head.parameters()) / 1e3:.0f}K parameters on frozen base {fingerprint} "
              f"({'FCA' if not args.no_fca else 'no FCA'}) x{world}, MFU against {peak / 1e9:.0f} GFLOP/s "
              f"({peak_name})")
    t_start = time.time()
    bar = tqdm(range(args.max_iters), disable=not master)
    done = 0  # optimizer steps completed
    try:
        for it in bar:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            logits, wrong, drafted, visible = [], [], [], []
            with ctx:
                for x0, refs in data.get_batch_with_references(enc, args.batch_size, rng):  # a tensor per task
                    hidden, w, d, v = fca_drafts(drafts_base, x0.to(args.device), x0.shape[1] - data.GEN_LEN,
                                                 args.draft_tokens, args.fca_dt, not args.no_fca,
                                                 references=labels_from(refs, args),
                                                 extra_only=args.draft_from == "extra")
                    logits.append(train_step_head(hidden.float()).flatten())
                    wrong.append(w.flatten())
                    drafted.append(d.flatten())
                    visible.append(v.flatten())
                wrong, drafted, visible = torch.cat(wrong), torch.cat(drafted), torch.cat(visible)
                logits = torch.cat(logits)
                loss = balanced_bce(logits, wrong, drafted) if args.loss == "balanced" else \
                    F.binary_cross_entropy_with_logits(logits[visible].float(), wrong[visible].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in head.parameters() if p.grad is not None])
            if not torch.isfinite(grad_norm):  # stop before a NaN reaches the head's weights
                bar.close()
                sys.exit(f"error: the gradient norm became {grad_norm.item()} at step {it}; stopped before the step, "
                         "nothing saved")
            optimizer.step()
            done = it + 1
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}", wrong=f"{wrong.sum().item() / drafted.sum().item():.1%}",
                            tok_s=f"{tokens_per_step / dt:.0f}",
                            mfu=f"{flops_per_step / dt / peak:.0%}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, as train_base.py; a head has no --resume, so no half-trained save
        bar.close()
        print(f"interrupted after step {done} of {args.max_iters}: nothing saved, {args.out} is unchanged")
        sys.exit(130)
    head.eval()
    if master:
        policy, by_tau = pick_remasking(base, head, enc, numbers(args.taus, float), args.val_problems, ctx)
        tau = policy.tau
        metrics = detection_metrics(base, head, enc, tau, ctx, args, batch_size=args.batch_size)
        decoded = decoding_detection(base, head, enc, tau, ctx, n=args.val_problems)
        save_checkpoint(args.out, model=head.state_dict(), model_args=asdict(config), base_fingerprint=fingerprint,
                        tokenizer_id=data.tokenizer_id(enc), metrics=metrics, decoded_metrics=decoded,
                        remasking=policy.settings(), val_accuracy=[[t, a] for t, a in by_tau.items()],
                        config=vars(args))
        print("validation accuracy at 4 tokens/step by tau: " + ", ".join(f"{t} {a:.1%}" for t, a in by_tau.items())
              + f"; picked tau={tau}")
        for what, m in [(f"held-out FCA drafts ({args.draft_tokens} at once)", metrics),
                        *((f"problems decoded at 4 tokens/step, {name}", m) for name, m in decoded.items())]:
            print(f"{what}: AUROC {m['auroc']:.3f}, positive rate {m['positive_rate']:.1%}, precision "
                  f"{m['precision']:.1%} and recall {m['recall']:.1%} at tau={tau} ({m['drafts']} tokens)")
        print(f"saved {args.out} after {time.time() - t_start:.0f} s")
    del train_step_head  # the DDP wrapper holds the process group: release it before the group is destroyed
    finish_distributed(head, world)
    return base, head, initial


if __name__ == "__main__":
    with interruptible("interrupted: nothing saved"):
        main()
