"""`megatron-gppo train CONFIG.yaml [dotted.key=value ...]`: CE-GPPO (or another loss) RL training."""

from __future__ import annotations

import argparse

from megatron_gppo.commands.launch import add_run_arguments, launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    def job(config) -> None:
        from megatron_gppo.trainer import run as train

        train(config)

    return launch(args, command="train", job=job)
