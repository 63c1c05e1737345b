"""Runs in .venv-cloud (SkyPilot's own environment, `make cloud-check`): reads a launch file with SkyPilot's parser and
prints, as JSON, what SkyPilot would run on one node of it: the `setup` and `run` bash scripts as its runtime wraps
them (sky.skylet.log_lib.make_task_bash_script, sky.backends.task_codegen.TaskCodeGen), with the task's envs, its
secrets and the SKYPILOT_* variables SkyPilot sets on that node.

    .venv-cloud/bin/python tests/skypilot_task.py TASK.yaml '{"env": {...}, "secrets": {...}, "rank": 0, "ips": [...]}'
"""

import json
import sys

import yaml
from sky import Task
from sky.backends.task_codegen import UNSET_RAY_ENV_VARS, TaskCodeGen
from sky.skylet import constants, log_lib


def main(path: str, spec: dict) -> dict:
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    task = Task.from_yaml_config(config, env_overrides=list(spec.get("env", {}).items()),
                                 secrets_overrides=list(spec.get("secrets", {}).items()))
    ips = spec.get("ips") or ["127.0.0.1"] * task.num_nodes
    gpus = spec.get("gpus_per_node", 0)
    env = {**task.envs, **{k: v.get_secret_value() for k, v in task.secrets.items()},
           constants.SKYPILOT_NUM_NODES: str(task.num_nodes), constants.SKYPILOT_NODE_IPS: "\n".join(ips),
           constants.SKYPILOT_NODE_RANK: str(spec.get("rank", 0)),
           constants.SKYPILOT_NUM_GPUS_PER_NODE: str(gpus)}
    # The setup runs on every node with these envs (SkyPilot's codegen prefixes it so), the run wrapped as a task.
    setup = log_lib.make_task_bash_script("unset CUDA_VISIBLE_DEVICES; " + task.setup, env_vars=env) if task.setup else None
    run = log_lib.make_task_bash_script(
        TaskCodeGen.build_task_bash_script(task.run, env_prefix=" && ".join(f"unset {v}" for v in UNSET_RAY_ENV_VARS)),
        env_vars=env)
    return {"name": task.name, "num_nodes": task.num_nodes, "workdir": task.workdir, "env": env,
            "storage_mounts": {dst: s.source for dst, s in task.storage_mounts.items()},
            "mount_modes": {dst: s.mode.value for dst, s in task.storage_mounts.items()},
            "managed_secrets": [ref.name for ref in task._managed_secret_refs],  # resolved at launch: required
            "setup": setup, "run": run}


if __name__ == "__main__":
    json.dump(main(sys.argv[1], json.loads(sys.argv[2])), sys.stdout)
