import torch

from grpo_cli.update.batching import plan, split
from grpo_cli.rollout.sampling import Rollout


def test_plan_covers_every_row_once_longest_first():
    lengths = [10, 40, 12, 39, 25, 11, 30]
    batches = plan(lengths, spread=0.75)
    assert sorted(i for b in batches for i in b) == list(range(7))
    # 40 and 39 and 30 (>= 0.75 x 40) together; 25 starts a new batch (< 30); then 12, 11, 10 (>= 0.75 x 25? no)
    assert batches == [[1, 3, 6], [4], [2, 5, 0]]


def test_plan_caps_rows_and_tokens():
    lengths = [20] * 10
    assert [len(b) for b in plan(lengths, max_rows=4, spread=0.75)] == [4, 4, 2]
    assert [len(b) for b in plan(lengths, max_tokens=60, spread=0.75)] == [3, 3, 3, 1]


def test_plain_plan_keeps_the_order():
    assert plan([5, 50, 7, 6]) == [[0, 1, 2, 3]]
    assert plan([5, 50, 7, 6], max_rows=3) == [[0, 1, 2], [3]]


def rollout_of(prompts: list[list[int]], completions: list[list[int]], group_size: int, pad=0) -> Rollout:
    """A hand-made rollout: prompts left-padded, completions right-padded (each ends in EOS=9)."""
    p = max(map(len, prompts))
    c = max(map(len, completions))
    ids, mask, cmask = [], [], []
    for i, completion in enumerate(completions):
        prompt = prompts[i // group_size]
        ids.append([pad] * (p - len(prompt)) + prompt + completion + [pad] * (c - len(completion)))
        mask.append([0] * (p - len(prompt)) + [1] * len(prompt) + [1] * len(completion) + [0] * (c - len(completion)))
        cmask.append([1] * len(completion) + [0] * (c - len(completion)))
    n = len(completions)
    return Rollout(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), completion_mask=torch.tensor(cmask),
                   prompt_len=p, texts=[""] * n,
                   truncated=torch.zeros(n, dtype=torch.bool), group_size=group_size)


def test_split_trims_each_batch_and_maps_prompts():
    rollout = rollout_of([[1, 2, 3], [4]], [[5, 9], [6, 6, 6, 6, 9], [7, 9], [8, 8, 8, 8, 9]], group_size=2)
    batches = split(rollout, max_tokens=None, spread=0.75)
    assert [b.rows.tolist() for b in batches] == [[1, 3], [0, 2]]
    long, short = batches
    assert long.completion_ids.tolist() == [[6, 6, 6, 6, 9], [8, 8, 8, 8, 9]]
    assert long.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4]] and long.prompt_index.tolist() == [0, 1]
    assert short.completion_ids.tolist() == [[5, 9], [7, 9]] and short.completion_mask.tolist() == [[1, 1], [1, 1]]
    # the rows rebuilt from a micro-batch are the rollout's rows without the all-padding columns
    for batch in batches:
        for j, row in enumerate(batch.rows.tolist()):
            full = rollout.input_ids[row][rollout.attention_mask[row].bool()]
            assert batch.input_ids[j][batch.attention_mask[j].bool()].tolist() == full.tolist()


def test_plain_split_is_one_batch_in_order():
    rollout = rollout_of([[1], [2]], [[5, 9], [6, 9], [7, 7, 9], [8, 9]], group_size=2)
    [batch] = split(rollout)
    assert batch.rows.tolist() == [0, 1, 2, 3] and batch.prompt_ids.shape == (2, 1)
