import torch

from remasking import RandomRemask, remask


def test_remask_respects_its_budget_and_fifo():
    p_wrong = torch.tensor([[0.9, 0.8, 0.95, 0.2, 0.99]])
    eligible = torch.tensor([[True, True, True, False, False]])  # above tau and revealed
    stamps = torch.zeros(1, 5, dtype=torch.long)
    chosen, stamps = remask(p_wrong, eligible, stamps, max_per_check=2, fifo_len=2)
    assert chosen.tolist() == [[True, False, True, False, False]]  # the 2 most likely wrong eligible ones
    chosen, stamps = remask(p_wrong, eligible, stamps, max_per_check=2, fifo_len=2)
    assert chosen.tolist() == [[False, True, False, False, False]]  # the last 2 sent back are skipped
    chosen, _ = remask(p_wrong, eligible, stamps, max_per_check=2, fifo_len=2)
    assert chosen.tolist() == [[True, False, False, False, False]]  # position 0 has left the FIFO


def test_random_control_replays_the_recorded_counts_then_sends_back_nothing():
    revealed = torch.rand(4, 20) < 0.5
    policy = RandomRemask(torch.tensor([[0, 1, 2, 3]]))
    state = policy.start(torch.zeros(4, 20, dtype=torch.long))
    chosen, state = policy.send_back(state, revealed, None)
    assert (chosen & ~revealed).sum() == 0
    assert chosen.sum(1).tolist() == [min(c, r) for c, r in zip([0, 1, 2, 3], revealed.sum(1).tolist())]
    chosen, state = policy.send_back(state, revealed, None)
    assert not chosen.any()  # past the recorded steps
