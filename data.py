"""
Tasks, tokenizer, verifiers and batches for the masked diffusion LM.

Two task families, each generated from a seed and each with a verifier:
  math: multi-step arithmetic with a worked solution, e.g. "(3+4)*7=" ->
        "3+4=07,07*7=49" or "3*7=21,4*7=28,21+28=49", and "2*3+4*5=" as a
        list of steps "2*3=06,4*5=20,06+20=26" or the prompt's equation
        continued "06+20=26". Score: final answer (GSM8K's metric), or strict:
        the final answer and every equation written true.
  code: small Python function synthesis, e.g. "sum of x*3 for x in xs if x>5"
        -> a generator expression, a list comprehension or a loop.
        Score: pass@1 on hidden unit tests that meet and miss every condition,
        run in sandbox.py; the values f returns are judged here.

Every prompt has several valid responses (free step order, equivalent forms
of different lengths): that is what makes revealing many tokens at once go
wrong, and so what self-correction has to fix. Splits are disjoint by a hash
of the problem; the test set is fixed by its seed, the same for every method.

The tokenizer is a tiktoken.Encoding built offline: 256 byte tokens, BPE
merges learned here from the training corpus, digits always single tokens,
plus <|eos|> and <|mask|>. Layout: a row is its prompt, left-padded with <|eos|>
to the narrowest of PROMPT_WIDTHS that holds it, followed by GEN_LEN response
tokens (right-padded with <|eos|>): the response is always the last GEN_LEN
columns. A math prompt (at most 12 tokens) takes 16 columns, a code prompt 48,
so math rows do not pay for 32 columns of padding; two static shapes serve
everything.
"""

import ast
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import tiktoken
import torch

import sandbox

PROMPT_WIDTHS, GEN_LEN = (16, 48), 32  # prompt columns: the narrowest that holds the prompt is used
PROMPT_LEN = PROMPT_WIDTHS[-1]  # the longest prompt the model reads
TASKS = ("math", "code")
TEST_SEED = 1234  # the fixed test set every method is scored on
WHOLE_SPLIT_PATIENCE = 20_000  # a split's last new problem turns up within about 5,000 draws
EOS, MASK = "<|eos|>", "<|mask|>"


@dataclass
class Problem:
    task: str
    prompt: str
    responses: list  # every valid response we know of; training draws one
    answer: object  # math: the int result; code: [(input list, expected)]
    key: str = ""  # what defines the problem (math: the prompt; code: the spec): decides its split


def split_of(key):
    """Which split a problem belongs to: a hash of what defines it, never random."""
    h = int(hashlib.md5(key.encode()).hexdigest(), 16) % 20
    return "test" if h < 2 else "val" if h == 2 else "train"


# -----------------------------------------------------------------------------
# math: worked arithmetic over single digits, several valid orders per prompt


def _mul(a, b, rng):  # a product may be written either way round
    return f"{a}*{b}" if rng.random() < 0.5 else f"{b}*{a}"


def math_problem(rng, level=2):
    """One arithmetic problem. level 1: a+b+c; level 2 (default): also a*b+c*d and
    (a+b)*c over digits 1-6; level 3: also a*b+c*d+e*f, digits 1-9. Each worked
    solution may take its steps in any free order; results are written with a
    fixed width of two digits (07), so every token's position follows from the form
    and layout. Sums take one of two layouts: a list of steps, or the prompt's
    equation continued (a chain), so valid responses differ in length and where
    the answer sits depends on the layout chosen: the dependency that parallel
    decoding breaks ((a+b)*c already has it: two steps or three)."""
    forms = {1: ["sum3"], 2: ["sum3", "prod2", "dist"], 3: ["sum3", "prod2", "dist", "prod3"]}[level]
    form = rng.choice(forms)
    top = 6 if level == 2 else 9  # level 2 keeps sums of products under 100: learnable in the CPU budget
    d = [rng.randint(1, top) for _ in range(6)]
    responses = []
    if form == "sum3":  # a+b+c: add any pair first
        a, b, c = d[:3]
        prompt, answer = f"{a}+{b}+{c}=", a + b + c
        for x, y, z in [(a, b, c), (a, c, b), (b, c, a)]:
            responses.append(f"{x}+{y}={x + y:02d},{x + y:02d}+{z}={answer:02d}")  # list
            responses.append(f"{x + y:02d}+{z}={answer:02d}")  # chain: 3+4+5=07+5=12
    elif form in ("prod2", "prod3"):  # sum of products: listed, all products one way round, or chained
        n = 2 if form == "prod2" else 3
        pairs = [(d[2 * i], d[2 * i + 1]) for i in range(n)]
        prompt = "+".join(f"{a}*{b}" for a, b in pairs) + "="
        answer = sum(a * b for a, b in pairs)
        # two products stay in the prompt's order: with both orders as well the small
        # base learned to pair the wrong factors
        orders = ([0, 1],) if n == 2 else ([0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1])
        # two products: one list (as the prompt writes them) and one chain (in its order),
        # drawn equally, so neither layout has variants that split its tokens and revealed
        # tokens that disagree mix the layouts; three (level 3): lists in four
        # orders with all products flipped together or not, chains in every order
        flip_sets = [(0,) * n] if n == 2 else [(0,) * n, (1,) * n]
        for order, flips in itertools.product(orders, flip_sets):
            steps = [f"{pairs[i][flip]}*{pairs[i][1 - flip]}={pairs[i][0] * pairs[i][1]:02d}"
                     for i, flip in zip(order, flips)]
            acc = pairs[order[0]][0] * pairs[order[0]][1]
            for i in order[1:]:
                p = pairs[i][0] * pairs[i][1]
                steps.append(f"{acc:02d}+{p:02d}={acc + p:02d}")
                acc += p
            responses.append(",".join(steps))  # list
        products = [f"{a * b:02d}" for a, b in pairs]
        chains = [products] if n == 2 else itertools.permutations(products)
        for perm in chains:  # chain: 2*3+4*5=06+20=26
            responses.append("+".join(perm) + f"={answer:02d}")
    else:  # (a+b)*c: add first, or distribute
        a, b, c = d[:3]
        prompt, answer = f"({a}+{b})*{c}=", (a + b) * c
        s = f"{a + b:02d}"
        responses.append(f"{a}+{b}={s}," + (f"{s}*{c}" if rng.random() < 0.5 else f"{c}*{s}") + f"={answer:02d}")
        ac, bc = f"{a * c:02d}", f"{b * c:02d}"
        responses.append(f"{_mul(a, c, rng)}={ac},{_mul(b, c, rng)}={bc},{ac}+{bc}={answer:02d}")
        responses.append(f"{_mul(b, c, rng)}={bc},{_mul(a, c, rng)}={ac},{bc}+{ac}={answer:02d}")
    return Problem("math", prompt, responses, answer, prompt)


def math_correct(problem, response):
    """Exact match of the final answer: the number after the last '=' (written with two digits)."""
    final = response.rsplit("=", 1)[-1].strip()  # ASCII only: isdigit() takes '³' (int() refuses it) and '٣'
    return re.fullmatch(r"[0-9]+", final) is not None and int(final) == problem.answer


def math_strict_correct(problem, response):
    """The final answer right and every equation written true. A response without a
    comma continues the prompt's equation (3+4+5= 07+5=12); a list's steps each stand
    alone (3+4=07,07*5=35). `05+==09` for 2+4+3= and `3*4=16,...` fail."""
    equations = response.split(",") if "," in response else [problem.prompt + response]
    return math_correct(problem, response) and all(_equation_holds(e) for e in equations)


def _equation_holds(text):
    sides = [_arithmetic(side) for side in text.split("=")]
    return len(sides) >= 2 and None not in sides and len(set(sides)) == 1


def _arithmetic(text):
    """The value of a sum or product of numbers (leading zeros allowed), with brackets;
    None if it is anything else."""
    if not re.fullmatch(r"[0-9+*()]+", text):  # not \d: it takes other scripts' digits too
        return None
    try:  # int("07"): Python's own parser refuses leading zeros
        node = ast.parse(re.sub(r"[0-9]+", lambda m: str(int(m.group())), text), mode="eval").body
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = value(node.left), value(node.right)
            if a is not None and b is not None:
                return a + b if isinstance(node.op, ast.Add) else a * b
        return None
    return value(node)


# -----------------------------------------------------------------------------
# code: one-line specs over a list, solved by a builtin, a comprehension or a loop

_EXPRS = {"x": lambda x, k: x, "x*k": lambda x, k: x * k, "x+k": lambda x, k: x + k,
          "x-k": lambda x, k: x - k, "x*x": lambda x, k: x * x}
_CONDS = {"": lambda x, k: True, "x>k": lambda x, k: x > k, "x<k": lambda x, k: x < k,
          "x!=k": lambda x, k: x != k, "x%2==0": lambda x, k: x % 2 == 0, "x%2==1": lambda x, k: x % 2 == 1}


def _bodies(op, e, c):
    """Equivalent function bodies for one spec: builtin, comprehension, loop."""
    guard = f" if {c}" if c else ""
    loop = "    for x in xs:\n" + (f"        if {c}:\n            " if c else "        ")
    if op == "sum":
        return [f"    return sum({e} for x in xs{guard})", f"    return sum([{e} for x in xs{guard}])",
                f"    s=0\n{loop}s+={e}\n    return s"]
    if op == "count":
        first = f"    return len([x for x in xs{guard}])" if c else "    return len(xs)"
        return [first, f"    return sum(1 for x in xs{guard})", f"    n=0\n{loop}n+=1\n    return n"]
    return [f"    return [{e} for x in xs{guard}]", f"    return list({e} for x in xs{guard})",
            f"    out=[]\n{loop}out.append({e})\n    return out"]


def code_problem(rng, level=2):
    """One function-synthesis problem. level 1: no condition; 2: one condition."""
    op = rng.choice(["sum", "count", "list"])
    e, c = rng.choice(list(_EXPRS)), rng.choice(list(_CONDS) if level >= 2 else [""])
    ke, kc = rng.randint(1, 9), rng.randint(1, 9)
    expr, cond = e.replace("k", str(ke)), c.replace("k", str(kc))
    fn = lambda xs: [_EXPRS[e](x, ke) for x in xs if _CONDS[c](x, kc)]  # noqa: E731
    result = {"sum": lambda xs: sum(fn(xs)), "count": lambda xs: len(fn(xs)), "list": fn}[op]
    what = {"sum": f"sum of {expr}", "count": "count", "list": f"list of {expr}"}[op]
    spec = f"{what} for x in xs" + (f" if {cond}" if cond else "")
    example = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    prompt = (f"def f(xs):\n    # {spec}\n    # f({json.dumps(example, separators=(',', ':'))})=="
              f"{json.dumps(result(example), separators=(',', ':'))}\n")
    # hidden tests depend only on the spec: [], then 0 and each number in it, up to three
    # steps either side (at the zero of x-k a threshold one off changes nothing), negated
    # and past 9, each value alone so that no two wrong terms cancel in a sum; mixed lists
    ks, rnd = [0] + [int(n) for n in re.findall(r"[0-9]+", spec)], random.Random(spec)
    values = sorted({s * (k + d) for k in ks for d in (*range(-3, 4), 10) for s in (1, -1)})
    tests = [[]] + [[v] for v in values] + [[rnd.randint(-20, 20) for _ in range(rnd.randint(3, 7))] for _ in range(4)]
    bodies = _bodies(op, expr if op != "count" else "x", cond)
    if "*" in expr and expr != "x*x":  # x*3 may also be written 3*x
        bodies += [b.replace(expr, f"{ke}*x") for b in bodies]
    return Problem("code", prompt, bodies, [(t, result(t)) for t in tests], spec)


def code_correct(problem, response):
    """pass@1: the prompt plus the generated body passes every hidden test. The sandbox
    returns only what f returned; the expected values never leave this process."""
    inputs = [xs for xs, _ in problem.answer]
    got = sandbox.run(problem.prompt + response + "\n", inputs)
    return got is not None and all(same_value(g, want) for g, (_, want) in zip(got, problem.answer))


def same_value(got, want):
    """Equal, and of the same plain type all the way down: True is not 1, 6.0 is not 6."""
    if type(got) is not type(want):
        return False
    if isinstance(want, list):
        return len(got) == len(want) and all(map(same_value, got, want))
    return got == want


def is_correct(problem, response, strict=False):
    verify = code_correct if problem.task == "code" else math_strict_correct if strict else math_correct
    return verify(problem, response)


def score(problems, responses, workers=2, strict=False):
    """Verifier verdicts for a list of problems and decoded responses, in order.
    strict: math by math_strict_correct (code is the same either way)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(partial(is_correct, strict=strict), problems, responses))


# -----------------------------------------------------------------------------
# problem streams and the fixed evaluation sets

MAKERS = {"math": math_problem, "code": code_problem}


def sample_problem(task, split, rng, level=2):
    """Draw problems of `task` until one falls in `split` (rejection by hash)."""
    while True:
        problem = MAKERS[task](rng, level)
        if split_of(problem.key) == split:
            return problem


@lru_cache(maxsize=None)
def fixed_problems(task, split="test", n=150, level=2, seed=TEST_SEED):
    """A fixed list of n distinct problems (no spec twice): the same for every run and
    method. n=None: every problem of the split, found by drawing until WHOLE_SPLIT_PATIENCE
    draws in a row bring nothing new; the first n of it are fixed_problems(..., n)."""
    rng, seen, out, stale = random.Random(f"{seed}-{task}-{split}-{level}"), set(), [], 0
    for _ in range(200 * n if n is not None else 10 ** 7):
        if len(out) == n or stale == WHOLE_SPLIT_PATIENCE:
            break
        p = sample_problem(task, split, rng, level)
        if p.key in seen:
            stale += 1
            continue
        stale = 0
        seen.add(p.key)
        out.append(p)
    if n is not None and len(out) < n:
        raise ValueError(f"the {split} split of {task} level {level} has fewer than {n} distinct problems")
    return tuple(out)


# -----------------------------------------------------------------------------
# tokenizer: byte-level BPE learned offline from our own training corpus

PATTERN = r"\d| ?[A-Za-z_]+| ?[^\sA-Za-z_\d]+|\n *| +|\s"  # \d alone: digits never merge


@lru_cache(maxsize=None)
def get_tokenizer(n_merges=200, corpus_size=4000, seed=0):
    """A tiktoken.Encoding with byte ranks plus merges learned from training data."""
    rng = random.Random(seed)
    words = Counter()
    for i in range(corpus_size):
        p = sample_problem(TASKS[i % 2], "train", rng)
        for text in [p.prompt] + p.responses:
            words.update(re.findall(PATTERN, text))
    ranks = {bytes([b]): b for b in range(256)}
    pieces = {tuple(bytes([b]) for b in w.encode()): c for w, c in words.items()}
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in pieces.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]), default=((b"", b""), 0))  # ties: by pair
        if count < 2:  # nothing left that occurs twice
            break
        ranks[a + b] = len(ranks)
        pieces = {_merge(w, a, b): c for w, c in pieces.items()}
    special = {EOS: len(ranks), MASK: len(ranks) + 1}
    enc = tiktoken.Encoding(name="sc-dlm", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=special)
    enc.eos, enc.mask = special[EOS], special[MASK]  # ids used everywhere else
    return enc


def _merge(word, a, b):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def tokenizer_id(enc):
    """A fingerprint of the tokenizer, stored in checkpoints to refuse mismatches."""
    blob = json.dumps(sorted((k.hex(), v) for k, v in enc._mergeable_ranks.items()))
    return hashlib.sha256(blob.encode() + PATTERN.encode()).hexdigest()[:16]


def encode_prompt(enc, prompt):
    """Prompt ids left-padded with EOS to the narrowest of PROMPT_WIDTHS that holds
    them; ValueError if none does."""
    ids = enc.encode_ordinary(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) > PROMPT_LEN:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the {PROMPT_LEN} the model reads")
    return [enc.eos] * (next(w for w in PROMPT_WIDTHS if w >= len(ids)) - len(ids)) + ids


def encode_prompts(enc, prompts):
    """(n, width) prompt ids sharing one width: the widest any of them needs."""
    rows = [encode_prompt(enc, p) for p in prompts]
    width = max(len(r) for r in rows)
    return torch.tensor([[enc.eos] * (width - len(r)) + r for r in rows], dtype=torch.long)


def encode_response(enc, response):
    ids = enc.encode_ordinary(response) + [enc.eos]  # at least one EOS: where the answer ends
    assert len(ids) <= GEN_LEN, f"response longer than GEN_LEN={GEN_LEN}: {response!r}"
    return ids + [enc.eos] * (GEN_LEN - len(ids))


def decode_response(enc, ids):
    """Text of a generated response: everything before the first EOS."""
    ids = itertools.takewhile(lambda i: i != enc.eos, ids)
    return enc.decode([i for i in ids if i < enc.eos])


def get_batch(enc, batch_size, rng, split="train", level=2):
    """A batch of batch_size rows as one tensor per task (math, code), each (rows,
    prompt width + GEN_LEN) with one random valid response per row. Three fifths math,
    two fifths code: with less code the base falls short on code."""
    return [torch.cat([encode_prompts(enc, [p.prompt for p in problems]), _encode(enc, chosen)], dim=1)
            for problems, chosen in _draw(batch_size, rng, split, level)]


def get_batch_with_references(enc, batch_size, rng, split="train", level=2):
    """get_batch (the same rows from the same rng), each row with every valid response
    of its problem: a list of (x0 (rows, W), references (rows, R, GEN_LEN)) per task,
    a row's list padded to R by repeating its first response."""
    batches = []
    for problems, chosen in _draw(batch_size, rng, split, level):
        x0 = torch.cat([encode_prompts(enc, [p.prompt for p in problems]), _encode(enc, chosen)], dim=1)
        width = max(len(p.responses) for p in problems)
        refs = torch.stack([_encode(enc, p.responses + p.responses[:1] * (width - len(p.responses))) for p in problems])
        batches.append((x0, refs))
    return batches


def _draw(batch_size, rng, split, level):
    """Per task, (problems, the valid response drawn for each), three fifths math."""
    out = []
    for task, n in (("math", batch_size - 2 * batch_size // 5), ("code", 2 * batch_size // 5)):
        if n == 0:
            continue
        problems = [sample_problem(task, split, rng, level) for _ in range(n)]
        out.append((problems, [rng.choice(p.responses) for p in problems]))
    return out


def _encode(enc, responses):
    return torch.tensor([encode_response(enc, r) for r in responses], dtype=torch.long)
