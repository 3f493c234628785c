"""Foresight training (Merlin: Foresight Pre-Training and Foresight Instruction-Tuning, Yu et al., ECCV 2024).

Scenes of identified subjects moving over frames (`scenes`), trajectory text with a strict parser (`trajectory`),
FPT / FIT / answer-only tasks with loss masks on the targets (`tasks`), trajectory and answer metrics with a
constant-velocity baseline (`metrics`), and the LoRA adapter on the patched model (`adapter`).
"""

from .adapter import AllowedTokens, ForesightAdapter, ForesightConfig, target_vocabulary
from .metrics import (
    TrajectoryScore,
    answer_accuracy,
    constant_velocity,
    mean_ci,
    parse_rate,
    score_tracks,
    score_trajectory,
    summarise,
)
from .scenes import Question, Scene, answer, generate_scene, make_questions, make_splits, render
from .tasks import (
    CharTokenizer,
    Encoded,
    Task,
    collate,
    detect_track_task,
    encode,
    fpt_tasks,
    question_task,
    track_task,
)
from .trajectory import Parsed, Response, format_trajectories, parse_response, parse_trajectories, scene_tracks

__all__ = [
    "AllowedTokens",
    "CharTokenizer",
    "Encoded",
    "ForesightAdapter",
    "ForesightConfig",
    "Parsed",
    "Question",
    "Response",
    "Scene",
    "Task",
    "TrajectoryScore",
    "answer",
    "answer_accuracy",
    "collate",
    "constant_velocity",
    "detect_track_task",
    "encode",
    "format_trajectories",
    "fpt_tasks",
    "generate_scene",
    "make_questions",
    "make_splits",
    "mean_ci",
    "parse_rate",
    "parse_response",
    "parse_trajectories",
    "question_task",
    "render",
    "scene_tracks",
    "score_tracks",
    "score_trajectory",
    "summarise",
    "target_vocabulary",
    "track_task",
]
