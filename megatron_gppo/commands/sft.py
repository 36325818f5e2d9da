"""`megatron-gppo sft CONFIG.yaml [dotted.key=value ...]`: supervised warm-up, exported to `train.output_dir/hf`."""

from __future__ import annotations

import argparse

from megatron_gppo.commands.launch import add_run_arguments, launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    def job(config) -> None:
        from megatron_gppo.sft import run as sft

        sft(config)

    return launch(args, command="sft", job=job)
