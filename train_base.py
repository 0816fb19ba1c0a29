"""
Train the masked diffusion LM from scratch on both task families (or, with
--objective ar, the same network as an autoregressive reference: autoregressive.py).

    python train_base.py                      # CPU default: 28-45 minutes on 2 cores, by machine
    python train_base.py --resume             # continue out/base.pt, its data stream included
    python train_base.py --objective proseco  # ProSeCo: unmask and correct, one network -> out/proseco.pt
    python train_base.py --objective ar       # the autoregressive reference, same network -> out/ar.pt
    torchrun --nproc_per_node=2 train_base.py # DistributedDataParallel, one data stream per rank

One flat loop: batch, forward, backward, step, log, evaluate, checkpoint. The
checkpoint (out/base.pt) holds the best state by validation accuracy, written at
each evaluation that matches or beats it, and the current state when the run is
interrupted (Ctrl-C or SIGTERM), so --resume loses nothing. Writes are atomic;
a run never writes over another kind of checkpoint, nor over a trained one
unless told to (--resume, --overwrite), and stops before a non-finite gradient
reaches the weights.
"""

import os
import signal

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load (seconds): exit 130, no traceback
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda *_: (os.write(2, b"interrupted\n"), os._exit(130)))

import argparse
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial

import torch
from tqdm import tqdm

import autoregressive
import data
from cli import check_flags, seed
from common import (CheckpointError, a_kind, check_fits, check_output_path, finish_distributed, interruptible, kind_of,
                    load_checkpoint, lr_at, parameter_count, peak_flops, pick_device, save_checkpoint,
                    setup_distributed, uninterrupted)
from model import Transformer, TransformerConfig, masked_diffusion_loss
from proseco import CORRECTOR_INPUT, CORRECTOR_INPUTS, proseco_loss
from sample import FixedSchedule, decode_problems

# The flags left unset take these, by machine: a CPU run of about the README's minutes
# on 2 cores, a larger one on CUDA. ProSeCo takes half the steps (take_defaults).
DEFAULTS = {"cpu": {"n_layer": 4, "n_embd": 192, "n_head": 6, "batch_size": 128, "max_iters": 3400},
            "cuda": {"n_layer": 8, "n_embd": 512, "n_head": 8, "batch_size": 512, "max_iters": 4000}}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["mdlm", "proseco", "ar"], default="mdlm",
                   help="mdlm: the masked diffusion loss; proseco: jointly trained to unmask and correct; "
                        "ar: the same network, causal, on next-token loss (autoregressive.py)")
    p.add_argument("--out", default=None, help="checkpoint path (default: out/base.pt, out/proseco.pt or out/ar.pt)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--n-layer", type=int, default=None, help="transformer blocks (default: 4 on CPU, 8 on CUDA)")
    p.add_argument("--n-embd", type=int, default=None, help="width (default: 192 on CPU, 512 on CUDA)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads (default: 6 on CPU, 8 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 128 CPU, 512 CUDA)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="optimizer steps (default: 3400 CPU, 4000 CUDA, ar as mdlm; half for proseco, "
                        "whose step costs two)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--corrector-input", choices=CORRECTOR_INPUTS, default=None,
                   help=f"proseco: where the corrector's training input shows the model's argmax (default "
                        f"{CORRECTOR_INPUT}; proseco.py)")
    p.add_argument("--elbo-weight", action="store_true",
                   help="weight the loss by 1/t (the MDLM bound) instead of mean CE; not for ar")
    p.add_argument("--eval-every", type=int, default=400, help="steps between validation and checkpoint")
    p.add_argument("--eval-problems", type=int, default=64, help="validation problems per task decoded at 1 token/step")
    p.add_argument("--level", type=int, default=2, help="task difficulty (1-3 math, 1-2 code)")
    p.add_argument("--seed", type=seed, default=1, help="data and init seed")
    p.add_argument("--resume", action="store_true", help="continue from --out: weights, optimizer and data stream")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a trained checkpoint")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    return p.parse_args(argv)


ARCHITECTURE = ("n_layer", "n_embd", "n_head")


def check_args(args):
    """Every flag, before any work: ValueError or CheckpointError naming the first that cannot work."""
    check_flags(args, [("--n-layer", args.n_layer >= 1, "at least 1"), ("--n-head", args.n_head >= 1, "at least 1"),
                       ("--n-embd", args.n_head >= 1 and args.n_embd >= 1 and args.n_embd % args.n_head == 0,
                        "a positive multiple of --n-head"),
                       ("--weight-decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0,
                        "a finite number, at least 0"),
                       ("--grad-clip", math.isfinite(args.grad_clip) and args.grad_clip > 0, "a finite number above 0"),
                       ("--eval-every", args.eval_every >= 1, "at least 1"),
                       ("--eval-problems", args.eval_problems >= 1, "at least 1"),
                       ("--level", args.level in (1, 2, 3), "1, 2 or 3"),
                       ("--elbo-weight", not (args.elbo_weight and args.objective == "ar"),
                        "left off with --objective ar, whose loss has no t"),
                       ("--corrector-input", args.corrector_input is None or args.objective == "proseco",
                        "given only with --objective proseco")])
    check_fits(parameter_count(Transformer, model_config(args)), args.device, 16, "--n-layer, --n-embd and --n-head")
    for task in data.TASKS:  # ValueError now, not at the first validation, if the split is too small
        data.fixed_problems(task, "val", args.eval_problems, args.level)
    check_output_path(args.out, args.objective, replace=args.resume or args.overwrite,
                      how="pass --resume to continue it or --overwrite to replace it")


def model_config(args):
    """The network the flags ask for (a resumed run: the flags its checkpoint set)."""
    return TransformerConfig(vocab_size=data.get_tokenizer().n_vocab, block_size=data.PROMPT_LEN + data.GEN_LEN,
                             n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                             causal=args.objective == "ar")


def checkpoint_to_resume(args, given, enc):
    """The checkpoint --resume continues; CheckpointError unless it was trained with this
    objective, this tokenizer and the architecture flags given (naming both sides)."""
    ckpt = load_checkpoint(args.out, made_by="python train_base.py")
    if kind_of(ckpt) != args.objective:
        raise CheckpointError(f"cannot resume: {args.out} is {a_kind(kind_of(ckpt))} checkpoint, "
                              f"this run trains --objective {args.objective}")
    if ckpt.get("tokenizer_id") != data.tokenizer_id(enc):
        raise CheckpointError(f"cannot resume: {args.out} was made with tokenizer {ckpt.get('tokenizer_id')}, "
                              f"this code builds {data.tokenizer_id(enc)}")
    missing = [key for key in ("optimizer", "model_args", "iter", "best_val", "config") if key not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume: {args.out} holds no {', '.join(missing)} (weights for decoding "
                              "only, as the shipped ones); train afresh with --overwrite or another --out")
    for name, value in given.items():
        if ckpt["model_args"][name] != value:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(f"cannot resume: {args.out} has {flag} {ckpt['model_args'][name]}, "
                                  f"this run asks for {flag} {value}")
    saved = ckpt["config"].get("corrector_input")
    if args.objective == "proseco" and args.corrector_input not in (None, saved):
        raise CheckpointError(f"cannot resume: {args.out} was trained with --corrector-input {saved}, "
                              f"this run asks for {args.corrector_input}")
    for name in ARCHITECTURE:  # the saved config says what actually ran
        setattr(args, name, ckpt["model_args"][name])
    return ckpt


def batch_loss(loss, model, batches, mask_id, elbo_weight):
    """The loss over a batch given as one tensor per task (data.get_batch, on the model's
    device), each row weighted equally; the prompt is whatever precedes the last GEN_LEN columns."""
    return sum(loss(model, x0, x0.shape[1] - data.GEN_LEN, mask_id, elbo_weight) * len(x0)
               for x0 in batches) / sum(len(x0) for x0 in batches)


def loss_of(objective, corrector_input=CORRECTOR_INPUT):
    """The training loss of an objective: loss(model, x0, prompt_len, mask_id, elbo_weight)."""
    if objective == "ar":  # next-token loss: no masks, no t
        return lambda model, x0, prompt_len, mask_id, elbo_weight: autoregressive.ar_loss(model, x0, prompt_len)
    if objective == "proseco":
        return partial(proseco_loss, corrector_input=corrector_input)
    return lambda *args: masked_diffusion_loss(*args)[0]  # the loss alone, not the pass it made


@torch.no_grad()
def validate(model, enc, objective, batch_size, n_problems, level, elbo_weight, ctx):
    """Validation loss on fixed batches and exact accuracy per task at one token per step
    (the AR model: its own loss, and greedy left-to-right decoding). Returns (loss,
    accuracy by task, math's strict accuracy)."""
    model.eval()
    device = next(model.parameters()).device
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    torch.manual_seed(0)  # the same masks every time: the loss is comparable across evaluations
    val_loss = loss_of("ar" if objective == "ar" else "mdlm")  # proseco: its masked loss alone
    losses = []
    for _ in range(4):
        batches = [x0.to(device) for x0 in data.get_batch(enc, batch_size, rng, split="val", level=level)]
        with ctx:
            losses.append(batch_loss(val_loss, model, batches, enc.mask, elbo_weight).item())
    torch.set_rng_state(state)
    acc = {}
    for task in data.TASKS:
        problems = data.fixed_problems(task, "val", n_problems, level)
        with ctx:
            if objective == "ar":
                responses, _ = autoregressive.decode_problems(model, enc, problems)
            else:
                responses, _ = decode_problems(model, enc, problems, FixedSchedule(data.GEN_LEN), generator=gen)
        acc[task] = sum(data.score(problems, responses)) / len(problems)
        if task == "math":  # logged, not part of the score that picks the checkpoint
            strict = sum(data.score(problems, responses, strict=True)) / len(problems)
    model.train()
    return sum(losses) / len(losses), acc, strict


def take_defaults(args, cuda):
    """Fill the flags left unset from DEFAULTS for this machine; ProSeCo's step costs two
    forward/backward passes, so it gets half the steps: the same FLOPs."""
    for name, value in DEFAULTS["cuda" if cuda else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value // 2 if name == "max_iters" and args.objective == "proseco" else value)


def streams(rng, cuda):
    """The random streams a step draws from (data and masks), as a checkpoint keeps them."""
    states = {"data_rng": rng.getstate(), "torch_rng": torch.get_rng_state()}
    return {**states, "cuda_rng": torch.cuda.get_rng_state()} if cuda else states


def restore_streams(ckpt, rng, master, seed_now, cuda):
    """Continue the data stream and the masks where the checkpoint's run stopped. Only rank
    0's stream is saved: the other ranks draw fresh ones (seed_now), never a replay."""
    if "data_rng" not in ckpt:
        if master:
            print("note: the checkpoint holds no data stream (saved by an older version): the stream restarts")
        return
    if master:
        rng.setstate(ckpt["data_rng"])
    else:
        rng.seed(seed_now)
    torch.set_rng_state(ckpt["torch_rng"])
    if cuda and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"])


def main(argv=None):
    # the run: flags, device and ranks, the machine's defaults, the checkpoint to resume
    args = get_args(argv)
    try:
        pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: --device: {e}")
    rank, local_rank, world, args.device = setup_distributed(args.device)  # torchrun: one rank per device
    master, cuda = rank == 0, args.device.startswith("cuda")
    given = {name: getattr(args, name) for name in ARCHITECTURE if getattr(args, name) is not None}
    take_defaults(args, cuda)
    if args.out is None:
        args.out = {"mdlm": "out/base.pt", "proseco": "out/proseco.pt", "ar": "out/ar.pt"}[args.objective]
    enc, ckpt = data.get_tokenizer(), None
    try:
        if args.resume:
            ckpt = checkpoint_to_resume(args, given, enc)
        check_args(args)
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    if args.objective == "proseco" and args.corrector_input is None:  # a resumed run keeps its own
        args.corrector_input = (ckpt and ckpt["config"].get("corrector_input")) or CORRECTOR_INPUT
    loss = loss_of(args.objective, args.corrector_input)
    torch.manual_seed(args.seed + rank)
    rng = random.Random(args.seed + rank)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # the model and its optimizer, fresh or resumed; compiled (static shapes: one compilation
    # serves the whole run) and wrapped for DDP, raw_model kept for saving and decoding
    config = TransformerConfig(**ckpt["model_args"]) if ckpt else model_config(args)
    start_iter, best_val = (ckpt["iter"], ckpt["best_val"]) if ckpt else (0, float("-inf"))
    model = raw_model = Transformer(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=cuda)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    if cuda and not args.no_compile:
        model = torch.compile(model, dynamic=False)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if cuda else None)
    peak, peak_name = peak_flops(args.device)
    tokens_per_iter = sum(x.numel() for x in data.get_batch(enc, args.batch_size, random.Random(0))) * world
    flops_per_token = raw_model.flops_per_token() * (2 if args.objective == "proseco" else 1)  # proseco: 2 passes
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters on {args.device} x{world}, "
              f"{tokens_per_iter} tokens/step, MFU against {peak / 1e9:.0f} GFLOP/s ({peak_name})")
    if ckpt:  # after everything above that draws random numbers (peak_flops does)
        restore_streams(ckpt, rng, master, f"{args.seed + rank}-{start_iter}", cuda)

    def checkpoint(done, stream):  # the data stream as step `done` left it: --resume sees no batch twice
        if master:
            save_checkpoint(args.out, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                            model_args=asdict(config), tokenizer_id=data.tokenizer_id(enc), iter=done,
                            best_val=best_val, config=vars(args), **stream)

    # --overwrite keeps the checkpoint it replaces until this run has an evaluated state to save
    keep_old, saved = args.overwrite and not args.resume and os.path.exists(args.out), False
    done, stream = start_iter, streams(rng, cuda)  # optimizer steps completed, and the streams after them
    bar = tqdm(range(start_iter, args.max_iters), initial=start_iter, total=args.max_iters, disable=not master)
    train_seconds = 0.0  # time in training steps only, for the average tok/s and MFU
    try:
        for it in bar:
            # the batch, at this step's learning rate
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            batches = [x0.to(args.device) for x0 in data.get_batch(enc, args.batch_size, rng, level=args.level)]
            # forward and backward; a non-finite loss or gradient stops the run before it reaches the weights
            with ctx:
                loss_now = batch_loss(loss, model, batches, enc.mask, args.elbo_weight)
            if not torch.isfinite(loss_now):
                bar.close()
                sys.exit(f"error: loss became {loss_now.item()} at step {it}; stopped, {args.out} is the last good "
                         "state")
            optimizer.zero_grad(set_to_none=True)
            loss_now.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if not torch.isfinite(grad_norm):
                bar.close()
                sys.exit(f"error: the gradient norm became {grad_norm.item()} at step {it}; stopped before the step, "
                         f"{args.out} is the last good state")
            # the step; a checkpoint saved on interruption never holds half of one
            with uninterrupted():
                optimizer.step()
                done, stream = it + 1, streams(rng, cuda)
            # the log
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_seconds += dt
            bar.set_postfix(loss=f"{loss_now.item():.3f}", tok_s=f"{tokens_per_iter / dt:.0f}",
                            mfu=f"{tokens_per_iter / dt * flops_per_token / peak / world:.0%}")
            # validation; the checkpoint holds the best evaluated state
            if master and ((it + 1) % args.eval_every == 0 or it + 1 == args.max_iters):
                val_loss, acc, strict = validate(raw_model, enc, args.objective, args.batch_size, args.eval_problems,
                                                 args.level, args.elbo_weight, ctx)
                score = sum(acc.values()) / len(acc)
                improved, best_val = score >= best_val, max(best_val, score)
                tqdm.write(f"step {it + 1}/{args.max_iters}: val loss {val_loss:.4f}, val acc (1 token/step) "
                           + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + f", math strict {strict:.1%}"
                           + ("" if improved else f"; below the best {best_val:.1%}, not saved"))
                if improved:
                    checkpoint(done, stream)
                    saved = True
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (common.interruptible): save, then exit 130
        bar.close()
        save_on_interrupt(lambda: checkpoint(done, stream), args.out, done, master, nothing_yet=keep_old and not saved)
    if master and done > start_iter:
        tok_s = (done - start_iter) * tokens_per_iter / train_seconds
        print(f"trained steps {start_iter}..{done} in {train_seconds / 60:.1f} min of steps: {tok_s:.0f} tokens/s, "
              f"MFU {tok_s * flops_per_token / peak / world:.0%} of {peak / 1e9:.0f} GFLOP/s")
    del model  # the DDP wrapper holds the process group: release it before the group is destroyed
    finish_distributed(raw_model, world)


def save_on_interrupt(checkpoint, out, done, master, nothing_yet):
    """An interrupted run saves its current state (--resume redoes no step and skips none)
    and exits 130; one that --overwrite started and that has no evaluated state yet
    saves nothing, so the checkpoint it would replace stays."""
    if nothing_yet:
        if master:
            print(f"interrupted after step {done}: nothing saved, {out} still holds the checkpoint it held before "
                  "(--overwrite replaces it at this run's first evaluation)")
        sys.exit(130)
    try:
        checkpoint()
    except CheckpointError as e:
        sys.exit(f"error: interrupted after step {done}: {e}")
    if master:
        print(f"interrupted after step {done}: saved {out}; continue with --resume")
    sys.exit(130)


if __name__ == "__main__":
    with interruptible("interrupted: nothing saved since the last checkpoint"):
        main()
