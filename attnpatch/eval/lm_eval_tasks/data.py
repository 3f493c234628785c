"""Functions the bundled lm-eval YAMLs name with `!function data.<name>` (lm-eval imports this file by path)."""

from __future__ import annotations

from attnpatch.eval.harness import dataset
from attnpatch.eval.tasks import hellaswag_preprocess


def arc_easy(**kwargs):
    return dataset("arc_easy", **kwargs)


def arc_challenge(**kwargs):
    return dataset("arc_challenge", **kwargs)


def piqa(**kwargs):
    return dataset("piqa", **kwargs)


def boolq(**kwargs):
    return dataset("boolq", **kwargs)


def hellaswag(**kwargs):
    return dataset("hellaswag", **kwargs)


def openbookqa(**kwargs):
    return dataset("openbookqa", **kwargs)


def copa(**kwargs):
    return dataset("copa", **kwargs)


def cb(**kwargs):
    return dataset("cb", **kwargs)


def sst2(**kwargs):
    return dataset("sst2", **kwargs)


def hellaswag_process_docs(docs):
    """lm-eval's `tasks/hellaswag/utils.py` process_docs (its `preprocess` is `tasks.hellaswag_preprocess`)."""

    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return docs.map(_process_doc)


# lm-eval's tasks/super_glue/copa/utils.py, verbatim (its choices start with a space of their own)
def copa_convert_choice(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc):
    correct_choice = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    return " " + copa_convert_choice(correct_choice)


def copa_doc_to_choice(doc):
    return [" " + copa_convert_choice(doc["choice1"]), " " + copa_convert_choice(doc["choice2"])]
