import torch

from opdx.rollout import Rollout, gather_logprobs, pad, response_mask


def test_response_mask_includes_first_eos_only():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 7, 2, 0, 0]])
    mask, finished = response_mask(tokens, 2)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_any_stop_id_ends_a_response():
    """A chat model's generation config lists several stop ids (end of turn, end of text): the
    first of any of them ends the response and its mask."""
    tokens = torch.tensor([[5, 6, 9, 2, 0], [5, 5, 5, 5, 5], [9, 7, 2, 0, 0]])
    mask, finished = response_mask(tokens, [2, 9])
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_padding_sides_and_masks():
    tokens, mask = pad([[1, 2, 3], [4]], pad_id=0, left=True)
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    rollout = Rollout.from_token_lists([[1, 2], [3]], [[5], [6, 7, 8]], pad_id=0)
    assert rollout.prompt_tokens_B_L.tolist() == [[1, 2], [0, 3]]
    assert rollout.response_tokens_B_T.tolist() == [[5, 0, 0], [6, 7, 8]]
    assert rollout.lengths_B.tolist() == [1, 3]


def test_gather_logprobs_is_the_log_softmax_of_the_token():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    expected = torch.tensor([[-torch.log(torch.tensor(2.0)), -torch.log1p(torch.exp(torch.tensor(-2.0)))]])
    torch.testing.assert_close(gather_logprobs(logits, torch.tensor([[1, 0]])), expected)


def test_select_keeps_the_rows_in_order_and_drops_prompt_columns_padding_in_all_of_them():
    rollout = Rollout.from_token_lists([[5, 6, 7, 8], [9], [3, 4]], [[1, 2], [3], [4, 5]], pad_id=0)
    rollout.problems = ["a", "b", "c"]
    picked = rollout.select([2, 1])
    assert picked.prompt_tokens_B_L.tolist() == [[3, 4], [0, 9]] and picked.prompt_mask_B_L.tolist() == [[1, 1], [0, 1]]
    assert picked.response_tokens_B_T.tolist() == [[4, 5], [3, 0]] and picked.problems == ["c", "b"]


def test_concat_pads_prompts_left_and_responses_right_and_keeps_the_row_order():
    first = Rollout.from_samples(["a"], [[5, 6, 7]], [[1, 2, 3]], [True], pad_id=0, logps_B=[[-1.0, -2.0, -3.0]])
    second = Rollout.from_samples(["b"], [[9]], [[4], [8, 2]], [False, True], pad_id=0, logps_B=[[-4.0], [-5.0, -6.0]])
    joined = Rollout.concat([first, second])
    assert joined.prompt_tokens_B_L.tolist() == [[5, 6, 7], [0, 0, 9], [0, 0, 9]]
    assert joined.prompt_mask_B_L.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert joined.response_tokens_B_T.tolist() == [[1, 2, 3], [4, 0, 0], [8, 2, 0]]
    assert joined.response_mask_B_T.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert joined.logp_sampling_B_T.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-5.0, -6.0, 0.0]]
    assert joined.finished_B.tolist() == [True, False, True] and joined.problems == ["a", "b", "b"]
    assert Rollout.concat([first]) is first


def test_longest_first_keeps_a_prompts_samples_together_and_trimmed_cuts_the_all_masked_columns():
    rollout = Rollout.from_samples(
        ["a", "b", "c"], [[5], [6, 7], [8]], [[1], [2, 2], [3, 3, 3, 3], [4], [5, 5], [6, 6]], [True] * 6, pad_id=0
    )
    assert rollout.longest_first().tolist() == [2, 3, 0, 1, 4, 5]  # prompt b's group has the 4-token response
    picked = rollout.select([4, 5]).trimmed()
    assert picked.response_tokens_B_T.tolist() == [[5, 5], [6, 6]] and picked.response_mask_B_T.all()
    assert rollout.select([0]).trimmed().response_tokens_B_T.tolist() == [[1]]
