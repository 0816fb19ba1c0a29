import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

import data  # noqa: E402
from model import Transformer, TransformerConfig  # noqa: E402


@pytest.fixture(scope="session")
def enc():
    return data.get_tokenizer()


def tiny_config(enc, **kw):
    return TransformerConfig(vocab_size=enc.n_vocab, block_size=data.PROMPT_LEN + data.GEN_LEN,
                             n_layer=kw.get("n_layer", 2), n_head=2, n_embd=kw.get("n_embd", 32))


@pytest.fixture
def tiny_model(enc):
    torch.manual_seed(0)
    return Transformer(tiny_config(enc)).eval()


# a training run small enough for a test: tiny model, tiny batch, CPU
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--batch-size", "8", "--eval-problems", "4",
        "--device", "cpu"]


def one_line_error(main, argv):
    """The SystemExit message of main(argv), checked to be one line starting 'error: '."""
    import pytest
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def untested_guarantees(skip_reasons):
    """The sandbox guarantees whose tests were skipped (tests/test_sandbox.needs), from
    the reasons pytest gives for its skips; sorted, without repeats."""
    prefix = "this machine's sandbox lacks "
    return sorted({name for reason in skip_reasons if prefix in reason
                   for name in reason.split(prefix, 1)[1].split(", ")})


def pytest_terminal_summary(terminalreporter):
    """Say loudly which sandbox guarantees this run could not test: a skip alone is easy to miss."""
    reasons = [str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
               for report in terminalreporter.stats.get("skipped", [])]
    missing = untested_guarantees(reasons)
    if missing:
        terminalreporter.section("sandbox guarantees NOT tested on this machine", sep="!", red=True, bold=True)
        terminalreporter.write_line(f"{', '.join(missing)}: the machine lacks them, so their tests were skipped "
                                    "(sandbox.guarantees())", red=True)
