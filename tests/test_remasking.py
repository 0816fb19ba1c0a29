import torch

from remasking import HeadRemask, RandomRemask, per_row_counts

ANYWHERE = (torch.ones(10, dtype=torch.bool), torch.tensor(4))  # block, steps_left: one block, not its last step


def test_random_control_sends_back_each_rows_count_at_that_rows_own_step():
    counts = torch.tensor([[1, 0], [2, 3]])  # (steps, rows): row 1 sends back nothing at its first step
    policy, revealed = RandomRemask(counts), torch.ones(2, 10, dtype=torch.bool)
    state = policy.start(torch.zeros(2, 10, dtype=torch.long))
    sent = []
    for reveals_now in ([True, False], [True, True], [True, True]):  # row 1 idles at the batch's first step
        chosen, state = policy.send_back(state, revealed, None, *ANYWHERE)
        assert not (chosen & ~revealed).any(), "sent back a token that was not revealed"
        sent.append(chosen.sum(1).tolist())
        state = policy.after_reveal(state, torch.tensor(reveals_now)[:, None].expand(2, 10), None)
    assert sent == [[1, 0], [2, 0], [0, 3]], f"each row follows its own steps, got {sent}"


def test_random_control_owes_what_a_step_could_not_send_back_to_the_next():
    policy = RandomRemask(torch.tensor([[3], [0]]))
    state = policy.start(torch.zeros(1, 10, dtype=torch.long))
    few = torch.zeros(1, 10, dtype=torch.bool)
    few[0, :2] = True  # two revealed tokens, three owed
    chosen, state = policy.send_back(state, few, None, *ANYWHERE)
    state = policy.after_reveal(state, few, None)
    chosen_next, _ = policy.send_back(state, torch.ones(1, 10, dtype=torch.bool), None, *ANYWHERE)
    assert (chosen.sum().item(), chosen_next.sum().item()) == (2, 1), "the step short did not pass its debt on"


def test_per_row_counts_index_each_rows_steps_from_its_first():
    sent_back = torch.tensor([[1, 0], [2, 5], [3, 7]])
    active = torch.tensor([[True, False], [True, True], [False, True]])
    assert per_row_counts(sent_back, active).tolist() == [[1, 5], [2, 7], [0, 0]]


class FixedLogits:
    """A stand-in head: the logit of P(wrong) it is given, per position, whatever the hidden states."""

    def __init__(self, logits):
        self.logits = torch.tensor(logits)

    def __call__(self, hidden):
        return self.logits


def first_check(policy, revealed):
    """What the policy sends back on a fresh canvas once the `revealed` tokens are revealed."""
    state = policy.after_reveal(policy.start(torch.zeros(revealed.shape, dtype=torch.long)), revealed, None)
    return policy.send_back(state, revealed, None, *ANYWHERE)[0]


def test_the_head_sends_back_a_token_only_if_its_p_wrong_is_above_tau():
    policy = HeadRemask(FixedLogits([[-2.0, 0.0, 2.0]]), tau=0.5, max_per_check=3, check_every=1)
    chosen = first_check(policy, torch.ones(1, 3, dtype=torch.bool))  # P(wrong): below, at, above tau
    assert chosen.tolist() == [[False, False, True]], f"only P(wrong) > tau goes back, got {chosen.tolist()}"


def test_the_head_sends_back_at_most_max_per_check_tokens_per_row_the_most_likely_wrong_first():
    policy = HeadRemask(FixedLogits([[1.0, 3.0, 2.0, 4.0, 0.5], [4.0, 1.0, 3.0, 2.0, 0.5]]), tau=0.5,
                        max_per_check=2, check_every=1)  # every token above tau
    chosen = first_check(policy, torch.ones(2, 5, dtype=torch.bool))
    assert chosen.tolist() == [[False, True, False, True, False], [True, False, True, False, False]], \
        f"each row sends back its 2 most likely wrong tokens, got {chosen.tolist()}"
