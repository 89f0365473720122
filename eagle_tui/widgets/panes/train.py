"""Pane 4: train the EAGLE-3 draft (training-time test length, learning rate, length, batch, processes)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Static

from eagle_tui.widgets.form import FieldRow
from eagle_tui.widgets.panes.base import Pane


class TrainPane(Pane):
    TITLE = "Train"
    SECTIONS = ("train",)
    STEPS = ("train",)

    def compose(self) -> ComposeResult:
        yield Static("Train the draft: one decoder layer over the target's three hidden states",
                     classes="pane-title")
        yield FieldRow("train.ttt_length", "TTT length", "int",
                       hint="draft steps unrolled per position (training-time test)")
        yield FieldRow("train.decay", "Step loss decay", "float",
                       hint="weight of step k is decay^k")
        yield FieldRow("train.lr", "Learning rate", "float")
        yield FieldRow("train.warmup_ratio", "Warm-up ratio", "float")
        yield FieldRow("train.epochs", "Epochs", "int")
        yield FieldRow("train.max_steps", "Max steps", "optint", placeholder="by epochs",
                       hint="stop after this many optimizer steps")
        yield FieldRow("train.max_tokens_per_batch", "Batch tokens", "int",
                       hint="packed tokens per micro-batch")
        yield FieldRow("train.grad_accum", "Grad accumulation", "int")
        yield FieldRow("train.grad_clip", "Grad clip", "float")
        yield FieldRow("train.val_fraction", "Validation share", "float")
        yield FieldRow("train.head_init", "Head init", "choice", choices=[
            ("random", "random"), ("target's head rows", "target")])
        yield FieldRow("train.freeze_head", "Freeze head", "bool", hint="with the target's head rows")
        yield FieldRow("train.init_from", "Warm start from", "optstr", placeholder="none",
                       hint="an exported draft or a run")
        yield FieldRow("train.save_every", "Save every", "int", hint="steps between checkpoints")
        yield FieldRow("train.select_prompts", "Selection prompts", "int",
                       hint="held-out τ at each checkpoint picks best")
        yield FieldRow("train.keep_last", "Keep checkpoints", "int")
        yield FieldRow("train.num_layers", "Draft layers", "int")
        yield FieldRow("train.nproc", "Processes", "int", hint="torchrun --nproc-per-node")
        yield FieldRow("train.seed", "Seed", "int")
        yield FieldRow("train.output_dir", "Output folder", "optstr", placeholder="WORKDIR/run")
