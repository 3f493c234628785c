"""Only Connect Wall harness: loader, prompts, parser, the authors' metrics, the constrained solver, the A/B runner."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from attnpatch.cli import main as cli_main
from attnpatch.eval.ocw import solver as ocw_solver
from attnpatch.eval.ocw import walls as ocw_walls
from attnpatch.eval.ocw.metrics import (
    chance_reference,
    clue2group,
    connection_metrics,
    grouping_metrics,
    paired_means,
    rouge1_f1,
    rouge_tokens,
)
from attnpatch.eval.ocw.runner import evaluate_ocw, generate_texts, rescore
from attnpatch.eval.ocw.solver import best_partition, pair_items, pair_matrix, partition_table, solve
from attnpatch.eval.ocw.walls import (
    OCWDataError,
    Wall,
    connections_done,
    connections_prompt,
    example_walls,
    grouping_done,
    grouping_prompt,
    load_walls,
    parse_connections,
    parse_groups,
    parse_walls,
    word_errors,
)

from tiny_models import llama_for, minilm_tokenizer

pytest.importorskip("sklearn")

GROUPS = [
    ["Apple", "Pear", "Plum", "Fig"],
    ["Red", "Blue", "Green", "Teal"],
    ["Mars", "Venus", "Earth", "Saturn"],
    ["Iron", "Gold", "Tin", "Lead"],
]
CONNECTIONS = ["Fruit", "Colours", "Planets", "Metals"]


def raw_wall(wall_id: str = "w001", groups=GROUPS, connections=CONNECTIONS) -> dict:
    """A wall in the dataset's JSON schema (words in group order, as in the project's copy)."""
    return {
        "wall_id": wall_id,
        "season": 1,
        "episode": 1,
        "words": [w for g in groups for w in g],
        "gt_connections": list(connections),
        "groups": {
            f"group_{i + 1}": {
                "group_id": f"{wall_id}_0{i + 1}",
                "gt_words": list(g),
                "gt_connection": c,
                "human_performance": {"grouping": 1, "connection": 1},
            }
            for i, (g, c) in enumerate(zip(groups, connections, strict=True))
        },
        "overall_human_performance": {"grouping": [1] * 4, "connections": [1] * 4},
    }


def wall(wall_id: str = "w001") -> Wall:
    return parse_walls({"dataset": [raw_wall(wall_id)]})[0]


def write_data(folder: Path, n_train: int = 3, n_val: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = [raw_wall(f"{split[0]}{i:03d}") for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps({"season_to_walls_map": {}, "dataset": rows}))
    return folder


# ---------------------------------------------------------------------------------------------------- loader


def test_loads_schema_and_keeps_group_order(tmp_path):
    walls = load_walls("validation", data_dir=write_data(tmp_path))
    assert [w.wall_id for w in walls] == ["v000", "v001", "v002"]
    w = walls[0]
    assert w.groups[2] == ("Mars", "Venus", "Earth", "Saturn") and w.connections[3] == "Metals"
    assert len(w.words) == 16 and w.season == 1


def test_numeric_clue_is_kept_as_text():
    raw = raw_wall(groups=[["Seven", 8.5, "1984", "2010"], *GROUPS[1:]])
    assert parse_walls([raw])[0].groups[0] == ("Seven", "8.5", "1984", "2010")


def test_loader_errors_name_wall_and_field():
    missing = raw_wall("miss")
    del missing["groups"]
    short = raw_wall("short")
    short["words"] = short["words"][:15]
    three = raw_wall("three")
    three["groups"]["group_2"]["gt_words"] = ["Red", "Blue", "Green"]
    mismatch = raw_wall("mism")
    mismatch["groups"]["group_4"]["gt_words"][0] = "Copper"
    no_id = raw_wall("x")
    del no_id["wall_id"]
    keys = raw_wall("keys")
    keys["groups"]["group_5"] = keys["groups"].pop("group_4")
    conn = raw_wall("conn")
    conn["gt_connections"][1] = "Colors"
    with pytest.raises(OCWDataError) as err:
        parse_walls({"dataset": [missing, short, three, mismatch, no_id, keys, conn, raw_wall("ok")]}, source="f.json")
    message = str(err.value)
    assert message.startswith("f.json: ")
    for expected in (
        "wall miss: groups: missing",
        "wall short: words: 15 entries, expected 16",
        "wall three: groups.group_2.gt_words: 3 entries, expected 4",
        "wall mism: groups: gt_words do not match the clues (not in words: ['copper']; in no group: ['iron'])",
        "wall #4: wall_id: missing",
        "wall keys: groups: expected keys group_1, group_2, group_3, group_4",
        "wall conn: gt_connections[1]: 'Colors' differs from groups.group_2.gt_connection",
    ):
        assert expected in message, expected
    assert "wall ok" not in message and len(err.value.problems) == 7


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ATTNPATCH_OCW_DIR"):
        load_walls("validation", data_dir=tmp_path)


def test_shared_data_loads():
    folder = ocw_walls.default_data_dir()
    if not (folder / "validation.json").is_file():
        pytest.skip("../shared/data/ocw not present")
    for split in ("train", "validation"):
        walls = load_walls(split)
        assert len(walls) == 62 and len({w.wall_id for w in walls}) == 62


# ---------------------------------------------------------------------------------------------------- prompts

EXPECTED_BASE_PROMPT = (
    ocw_walls.TASK1_SYSTEM + "\n\nExample solved wall(s):\n\nExample 1\n"
    "Apple, Pear, Plum, Fig. Connection: Fruit\nRed, Blue, Green, Teal. Connection: Colours\n"
    "Mars, Venus, Earth, Saturn. Connection: Planets\nIron, Gold, Tin, Lead. Connection: Metals\n\n"
    "Clues: {clues}\n\nSolved wall:\n"
)


def test_grouping_prompt_text_and_determinism():
    w, example = wall("target"), wall("t000")
    clues = w.clues()
    assert sorted(clues) == sorted(w.words) and clues != list(w.words)  # shuffled, same clues
    assert clues == w.clues() and w.clues(seed=1) != clues  # fixed per (wall, seed)
    prompt = grouping_prompt(w, [example])
    assert prompt == EXPECTED_BASE_PROMPT.format(clues=", ".join(clues))
    assert grouping_prompt(w, [example]) == prompt
    zero = grouping_prompt(w, [])
    assert "Example" not in zero and zero.endswith(f"Clues: {', '.join(clues)}\n\nSolved wall:\n")


def test_clue_order_is_fixed():
    """random.Random seeded with a string (not hash()): the same order in every process and PYTHONHASHSEED."""
    clues = Wall("w", tuple("abcdefghijklmnop"), (), ()).clues()
    assert clues == ["k", "e", "o", "g", "f", "d", "m", "h", "l", "i", "a", "p", "j", "c", "b", "n"]


def test_connections_prompt_lists_gt_groups():
    prompt = connections_prompt(wall(), [])
    assert prompt.startswith(ocw_walls.TASK2_SYSTEM + "\n\nGroups:\nApple, Pear, Plum, Fig. Connection:\n")
    assert prompt.endswith("Iron, Gold, Tin, Lead. Connection:\n\nSolved wall:\n")


def test_examples_are_the_notebooks_draw():
    train = [wall(f"t{i:03d}") for i in range(20)]
    picked = random.Random(42).sample(range(20), 3)
    assert example_walls(train, 3) == [train[i] for i in picked]
    assert example_walls(train, 0) == []
    with pytest.raises(ValueError, match="only 20 training walls"):
        example_walls(train, 21)


def test_chat_template_prompt():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = grouping_prompt(wall(), [], tokenizer=tok)
    assert prompt.startswith(f"<|system|>{ocw_walls.TASK1_SYSTEM}<|end|><|user|>Clues: ")
    assert prompt.endswith("\n\nSolved wall:<|end|><|assistant|>")


# ---------------------------------------------------------------------------------------------------- parser

CLUES = [w for g in GROUPS for w in g]


def test_parser_numbered_groups_and_connection_suffix():
    text = (
        "Here is the solved wall:\n\n"
        "Group 1: Apple, Pear, Plum, Fig. Connection: Fruit, mostly\n"
        "Group 2: red, Blue, Green, Teal\n"
        "3. Mars, Venus, Earth, Saturn. connection: planets\n"
        "- Iron, 'Gold', Tin., Lead\n"
        "Group 5: extra, line, is, ignored\n"
    )
    groups = parse_groups(text, CLUES)
    assert groups == [GROUPS[0], ["Red", "Blue", "Green", "Teal"], GROUPS[2], GROUPS[3]]
    assert word_errors(groups, CLUES) == {"misformatted": 0, "hallucinated": 0}
    assert grouping_metrics(groups, GROUPS)["full_wall"]


def test_parser_chat_habits():
    """Code fences are skipped; a label in front of the first clue ("Clues: Ash") is not part of the clue."""
    text = "```plaintext\nClues: Apple, Pear, Plum, Fig\n**Red**, Blue, Green, Teal\n```\nColours: Mars, Venus\n"
    groups = parse_groups(text, CLUES)
    assert groups[:3] == [GROUPS[0], GROUPS[1], ["Mars", "Venus", "", ""]]
    assert parse_groups("Clues: Apple, Pear", ()) == [["Clues: Apple", "Pear", "", ""]] + [[""] * 4] * 3


def test_parser_too_few_too_many_and_hallucinated():
    text = "Apple, Pear\nRed, Blue, Green, Teal, Mars, Venus\nBanana, Kiwi, Iron, Gold\n"
    groups = parse_groups(text, CLUES)
    assert groups == [
        ["Apple", "Pear", "", ""],
        ["Red", "Blue", "Green", "Teal"],
        ["Banana", "Kiwi", "Iron", "Gold"],
        ["", "", "", ""],
    ]
    assert word_errors(groups, CLUES) == {"misformatted": 6, "hallucinated": 2}


@pytest.mark.parametrize("text", ["", None, "\n\n  \n", "I cannot solve this wall.", "::::"])
def test_parser_unparseable_output(text):
    groups = parse_groups(text, CLUES)
    assert len(groups) == 4 and all(len(g) == 4 for g in groups)
    errors = word_errors(groups, CLUES)
    assert errors["misformatted"] + errors["hallucinated"] == 16
    metrics = grouping_metrics(groups, GROUPS)
    assert metrics["correct_groups"] == 0 and metrics["WD"] == 1.0


def test_parse_connections():
    text = "Sure!\n\nApple, Pear, Plum, Fig. Connection: Fruit\n\nRed, Blue. connection:Colours \nno label here\n"
    assert parse_connections(text) == ["Fruit", "Colours", "", ""]
    many = "\n".join(f"x. Connection: c{i}" for i in range(6))
    assert parse_connections(many) == ["c0", "c1", "c2", "c3"]
    assert parse_connections(None) == ["", "", "", ""]


MESSY = (
    "Group 1: Apple, Pear, Plum\nSolved:\n\n2) Red, Blue, Green, Teal. Connection: colours\n"
    "Mars, Venus. Connection: a, b\nIron, Gold, Tin, Lead\nmore text Connection: z\nand more. Connection: w\n"
    "last. Connection: v\n"
)


@pytest.mark.parametrize(
    ("done", "parse"), [(grouping_done, lambda t: parse_groups(t, CLUES)), (connections_done, parse_connections)]
)
def test_early_stop_never_changes_the_parse(done, parse):
    """Generation stops at the first prefix where done() holds: its parse must equal the full output's."""
    stops = [k for k in range(len(MESSY) + 1) if done(MESSY[:k])]
    assert stops and stops[0] < len(MESSY)
    for k in stops:
        assert parse(MESSY[:k]) == parse(MESSY)


# ---------------------------------------------------------------------------------------------------- metrics

A, B, C, D = (["a1", "a2", "a3", "a4"], ["b1", "b2", "b3", "b4"], ["c1", "c2", "c3", "c4"], ["d1", "d2", "d3", "d4"])
GT = [A, B, C, D]


def test_perfect_prediction():
    shuffled = [[" B2", "b1", "b4", "B3"], D, A[::-1], C]  # any group order, word order, case, whitespace
    m = grouping_metrics(shuffled, GT)
    assert m == {"correct_groups": 4, "full_wall": True, "WD": 0.0, "AMI": 1.0, "ARI": 1.0, "FMS": 1.0}


def test_label_construction():
    # Labels are the ground-truth group (position // 4 in the reference); unknown words get 4, 5, ... in order, one
    # fresh label per occurrence; a known word keeps its label wherever it appears.
    reference = A + B + C + D
    assert clue2group(["a1", "zz", "b3", "yy", "a1", "zz"], reference) == [0, 4, 1, 5, 0, 6]
    assert clue2group(reference, reference) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_partial_prediction_by_hand():
    """a4 and b1 swapped; C and D right.

    Sorted groups: [a1 a2 a3 b1] -> true labels [0 0 0 1]; [a4 b2 b3 b4] -> [0 1 1 1]; C -> [2 2 2 2]; D -> [3 3 3 3].
    correct_groups = 2 (C, D). WD: slices equal to a ground-truth slice ([2 2 2 2], [3 3 3 3]) are dropped; the rest
    pair up in order: W([0 0 0 1], [0 0 0 0]) = 1/4 (a quarter of the mass moves by 1), W([0 1 1 1], [1 1 1 1]) = 1/4;
    WD = (1/4 + 1/4) / 4 = 0.125.
    Contingency (predicted cluster x true group): rows [3 1 0 0], [1 3 0 0], [0 0 4 0], [0 0 0 4]; every row and column
    sums to 4. Pairs together in both: 3 + 3 + 6 + 6 = 18 of C(16,2) = 120; pairs per side 4 * C(4,2) = 24.
    ARI = (18 - 24 * 24 / 120) / (24 - 24 * 24 / 120) = 13.2 / 19.2 = 0.6875. FMS = 18 / sqrt(24 * 24) = 0.75.
    MI = (6/16) ln 3 + (8/16) ln 4 (= 1.1051); AMI needs the expected MI, so it is checked against sklearn only.
    """
    from sklearn.metrics import adjusted_mutual_info_score

    m = grouping_metrics([["a1", "a2", "a3", "b1"], ["b2", "b3", "b4", "a4"], C, D], GT)
    assert m["correct_groups"] == 2 and not m["full_wall"]
    assert m["WD"] == pytest.approx(0.125) and m["ARI"] == pytest.approx(0.6875) and m["FMS"] == pytest.approx(0.75)
    true = [0, 0, 0, 1, 0, 1, 1, 1] + [2] * 4 + [3] * 4
    assert m["AMI"] == pytest.approx(adjusted_mutual_info_score([k // 4 for k in range(16)], true))
    assert 0.6 < m["AMI"] < 0.8


def test_repeated_group_and_hallucinations_by_hand():
    # A predicted twice, B missing: correct_groups counts distinct matches = 3 (A, C, D). Slices [0000] [0000] [2222]
    # [3333] vs [0000] [1111] [2222] [3333]: one [0000], [2222] and [3333] drop with their ground-truth slices;
    # W([0000], [1111]) = 1 -> WD = 1/4. (The authors' remove_same raises ValueError on this input.)
    m = grouping_metrics([A, A, C, D], GT)
    assert m["correct_groups"] == 3 and m["WD"] == pytest.approx(0.25)
    # Hallucinated ("x", "y") and misformatted ("") words get fresh labels 4, 5, ... in order. Sorted groups and
    # labels: [a1 a2 x y] -> [0 0 4 5]; [a3 a4 b1 b2] -> [0 0 1 1]; ["" "" b3 b4] -> [6 7 1 1]; C -> [2 2 2 2].
    # C drops with its ground-truth slice; the rest pair with [0000], [1111], [3333] in order:
    # W([0 0 4 5], [0 0 0 0]) = (4 + 5) / 4 -> clipped to 1; W([0 0 1 1], [1 1 1 1]) = 2 / 4;
    # W([1 1 6 7], [3 3 3 3]) = (2 + 2 + 3 + 4) / 4 -> clipped to 1. WD = (1 + 0.5 + 1) / 4 = 0.625.
    m = grouping_metrics([["a1", "a2", "x", "y"], ["a3", "a4", "b1", "b2"], ["b3", "b4", "", ""], C], GT)
    assert m["correct_groups"] == 1 and m["WD"] == pytest.approx(0.625)


def test_missing_prediction_is_all_misformatted():
    m = grouping_metrics(None, GT)
    assert m["correct_groups"] == 0 and m["WD"] == 1.0 and m["ARI"] == 0.0 and m["FMS"] == 0.0


def test_rouge1_by_hand():
    # pred {english, cricket, captains}, ref {cricket, captains, of, england}: overlap 2, P = 2/3, R = 2/4,
    # F1 = 2 P R / (P + R) = (2/3) / (7/6) = 4/7.
    assert rouge1_f1("English cricket captains", "Cricket captains of England") == pytest.approx(4 / 7)
    assert rouge_tokens("U.S. Presidents' pets — Pokémon!") == ["u", "s", "presidents", "pets", "pok", "mon"]
    assert rouge1_f1("the the cat", "the cat") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rouge1_f1("", "trees") == 0.0 and rouge1_f1("...", "") == 0.0


def test_rouge1_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    pairs = [("Famous Ashleys", "ashleys"), ("U.S. presidents", "us presidential losers"), ("", "x"), ("a b a", "a")]
    for pred, ref in pairs:
        assert rouge1_f1(pred, ref) == pytest.approx(scorer.score(ref, pred)["rouge1"].fmeasure)


def test_connection_metrics():
    m = connection_metrics([" Fruit ", "colour", "Planets of the solar system"], CONNECTIONS)
    assert m["exact_match_groups"] == [1.0, 0.0, 0.0, 0.0]
    assert m["rouge1_f1_groups"] == pytest.approx([1.0, 0.0, 2 * (1 / 5) / (1 + 1 / 5), 0.0])
    assert m["exact_match"] == 0.25 and m["bert_score_f1"] is None


def test_chance_reference():
    stored = chance_reference()
    assert stored["correct_groups_per_wall"] == pytest.approx(4 / 455) and stored["full_wall_rate"] == 1 / 2_627_625
    c = chance_reference(n=150, seed=1)  # a fresh small simulation agrees with the stored 20,000-partition one
    for key, tol in (("AMI", 0.02), ("ARI", 0.02), ("FMS", 0.02), ("WD", 0.03)):
        assert c[key] == pytest.approx(stored[key], abs=tol), key
    assert abs(stored["AMI"]) < 0.005 and abs(stored["ARI"]) < 0.005


def test_paired_means_by_hand():
    # Differences [1 1 1 1]: of the 16 sign patterns only all-plus and all-minus reach |mean| 1 -> p = 2/16.
    p = paired_means([0, 0, 0, 0], [1, 1, 1, 1])
    assert p["diff"] == 1.0 and p["diff_ci"] == (1.0, 1.0) and p["p"] == pytest.approx(2 / 16)
    assert paired_means([0.5, 0.2], [0.5, 0.2])["p"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_means([1, 2], [1])


# ---------------------------------------------------------------------------------------------------- solver


def test_partition_table_is_every_partition():
    groups, partitions = partition_table()
    assert groups.shape == (1820, 4) and partitions.shape == (2_627_625, 4)
    masks = (1 << groups.astype(np.int64)).sum(axis=1)[partitions.astype(np.int64)]
    assert (masks.sum(axis=1) == 0xFFFF).all() and (np.bitwise_or.reduce(masks, axis=1) == 0xFFFF).all()
    assert len(np.unique(masks.astype(np.int64) @ (1 << np.arange(0, 64, 16)), axis=0)) == 2_627_625


def _planted(seed: int, noise: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.repeat(np.arange(4), 4)[rng.permutation(16)]
    scores = rng.normal(scale=noise, size=(16, 16)) + 2.0 * (label[:, None] == label[None, :])
    return scores, label


def _as_sets(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solver_finds_planted_partition(seed):
    scores, label = _planted(seed)
    truth = _as_sets([np.flatnonzero(label == k).tolist() for k in range(4)])
    assert _as_sets(best_partition(scores)) == truth
    # per-clue biases (a clue's frequency as a continuation, its strength as an anchor) cannot move the optimum
    rng = np.random.default_rng(seed + 10)
    biased = scores + rng.normal(scale=5, size=(16, 1)) + rng.normal(scale=5, size=(1, 16))
    assert _as_sets(best_partition(biased)) == truth


def _total(scores: np.ndarray, groups) -> float:
    sym = scores + scores.T
    return sum(sym[i, j] for g in groups for i, j in itertools.combinations(g, 2))


def test_solver_is_optimal_against_swaps_and_random_partitions():
    scores = np.random.default_rng(5).normal(size=(16, 16))
    best = best_partition(scores)
    value = _total(scores, best)
    for g, h in itertools.combinations(range(4), 2):
        for i, j in itertools.product(range(4), range(4)):
            swapped = copy.deepcopy(best)
            swapped[g][i], swapped[h][j] = best[h][j], best[g][i]
            assert _total(scores, swapped) <= value + 1e-9
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert _total(scores, rng.permutation(16).reshape(4, 4).tolist()) <= value + 1e-9


def test_solve_returns_clue_groups_in_first_clue_order():
    scores, label = _planted(0)
    clues = [f"c{i}" for i in range(16)]
    groups = solve(clues, scores)
    assert sorted(w for g in groups for w in g) == sorted(clues)
    assert [clues.index(g[0]) for g in groups] == sorted(clues.index(g[0]) for g in groups)
    with pytest.raises(ValueError, match="16x16"):
        best_partition(np.zeros((4, 4)))


def test_pair_items_and_matrix():
    clues = [f"c{i}" for i in range(16)]
    items = pair_items(clues, prefix="P\n")
    assert len(items) == 16 and items[3].context == "P\nc3," and items[3].options[:3] == [" c0", " c1", " c2"]
    assert len(items[3].options) == 15 and " c3" not in items[3].options
    logprobs = [[100 * i + j for j in range(16) if j != i] for i in range(16)]
    matrix = pair_matrix(logprobs)
    assert matrix[3, 7] == 307 and matrix[7, 3] == 703 and matrix[5, 5] == 0


# ---------------------------------------------------------------------------------------------------- runner and CLI


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return llama_for(tokenizer, layers=4, positions=1024)


def test_pair_scores_are_model_logprobs(model, tokenizer):
    clues = [f"word{i}" for i in range(16)]
    matrix = ocw_solver.pair_scores(model, tokenizer, [clues], batch_size=7)[0]
    context = tokenizer("word2,")["input_ids"][:-1]  # [CLS] ... without [SEP]
    option = tokenizer(" word9", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([context + option])).logits[0].log_softmax(-1)
    expected = sum(float(logits[len(context) - 1 + k, t]) for k, t in enumerate(option))
    assert matrix[2, 9] == pytest.approx(expected, abs=1e-4)


def test_generation_stops_when_done(model, tokenizer):
    prompts = ["one two three", "four"]
    first = generate_texts(model, tokenizer, prompts, max_new_tokens=1, batch_size=2)
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, done=lambda t: True) == first
    full = generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, done=lambda t: False) == full
    assert full != first


def test_unparseable_output_is_scored_not_raised(model, tokenizer):
    walls = [wall("v000"), wall("v001")]
    report = evaluate_ocw(model, tokenizer, walls, train=[wall("t000")], shots=1, max_new_tokens=5, progress=False)
    result = report.results["unpatched"]
    assert len(result["per_wall"]) == 2 and result["task1"]["correct_groups"] == 0
    for record in result["per_wall"]:
        assert record["misformatted"] + record["hallucinated"] == 16 and record["WD"] == 1.0
        assert record["predicted_connections"] == ["", "", "", ""]
    assert result["task2"]["exact_match"] == 0.0


def test_rescore_reproduces_and_reparses(model, tokenizer):
    walls = [wall("v000"), wall("v001")]
    configs = {"unpatched": None, "act": {"method": "act"}}
    report = evaluate_ocw(model, tokenizer, walls, configs=configs, shots=0, max_new_tokens=4, progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    again = rescore(data, walls + [wall("other")])
    assert json.loads(json.dumps(again.to_dict())) == data
    answer = "\n".join(", ".join(g) for g in GROUPS[::-1])
    data["results"]["act"]["per_wall"][1]["output"] = answer  # as if the patched model had solved wall v001
    fixed = rescore(data, walls)
    assert fixed.results["act"]["task1"]["full_wall"] == 1 and fixed.results["unpatched"]["task1"]["full_wall"] == 0
    assert fixed.paired["act"]["solved"]["b_only"] == 1
    with pytest.raises(ValueError, match="not among the given walls"):
        rescore(data, walls[:1])
    with pytest.raises(ValueError, match="only generate-mode"):
        rescore({**data, "mode": "constrained"}, walls)


@pytest.mark.parametrize("mode", ["constrained", "generate"])
def test_cli_ab_end_to_end(tmp_path, model, tokenizer, mode):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_data(tmp_path / "ocw")
    out = tmp_path / "out" / "ocw"
    argv = ["eval", "--task", "ocw", "--model", str(tmp_path / "model"), "--data", str(data), "--limit", "2"]
    argv += ["--mode", mode, "--shots", "1", "--max-new-tokens", "4", "--out", str(out)]
    assert cli_main(argv) == 0
    report = json.loads((tmp_path / "out" / "ocw.json").read_text())
    assert report["walls"] == ["v000", "v001"] and list(report["configs"]) == ["unpatched", "act"]
    assert report["paired"]["act"]["solved"]["n"] == 2 and "AMI" in report["paired"]["act"]
    assert ("exact_match" in report["paired"]["act"]) == (mode == "generate")
    table = (tmp_path / "out" / "ocw.md").read_text()
    assert "| unpatched | 0/2 |" in table and "Paired differences vs unpatched" in table
    assert "Chance (uniformly random partition): 0.018 correct groups in 2 walls" in table


def test_cli_rejects_other_tasks(capsys):
    assert cli_main(["eval", "--task", "sst2"]) == 2
    assert "only 'ocw'" in capsys.readouterr().err
