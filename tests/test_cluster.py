"""Running on a Ray cluster: address precedence, resource requests, placement groups, and a real
two-node cluster started on this machine (head + worker node, token authentication on) that a search
runs against, with candidates evaluated on both nodes."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY, deep_merge
from run_output import Lines
from test_resume import _assert_same_run

import evo_subens
from evo_subens.core.reaper import descendants, mentions
from evo_subens.cli import _with_address, build_parser, main
from evo_subens.core.cluster import (LOCAL_NODE, check_output_dir, check_reachable, placeable_actors,
                                resolve_address, token_settings)
from evo_subens.core.config import WorkersConfig, load_config
from evo_subens.errors import ConfigError
from evo_subens.core.problem import make_problem

RAY_BIN = Path(sys.executable).parent / "ray"
NODE_ID = re.compile(r"[0-9a-f]{56}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- address, resources, placement: unit checks -----------------------------------------------------


def test_address_precedence(monkeypatch) -> None:
    """--address > workers.address > RAY_ADDRESS > a local Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == (None, "workers.address")
    monkeypatch.setenv("RAY_ADDRESS", "env-head:6379")
    assert resolve_address(None) == ("env-head:6379", "workers.address (from RAY_ADDRESS)")
    assert resolve_address("cfg-head:6379")[0] == "cfg-head:6379"
    args = build_parser().parse_args(["run", "c.yaml", "workers.address=cfg-head:6379", "--address", "10.0.0.1:6379"])
    cfg = load_config(None, _with_address(args))
    assert cfg.workers.address == "10.0.0.1:6379"  # the flag wins over an override of the same field
    args = build_parser().parse_args(["resume", "runs/x", "--address", "flag-head:1"])
    assert _with_address(args) == ['workers.address="flag-head:1"']


def test_unreachable_address_is_a_config_error() -> None:
    """Ray retries a dead address forever; the package refuses it at once, naming the field: on the
    refused connection itself, not after waiting for a timeout."""
    port = _free_port()
    with pytest.raises(ConfigError) as info:
        check_reachable(f"127.0.0.1:{port}", "workers.address")
    assert info.value.field == "workers.address"
    assert f"nothing answered at 127.0.0.1:{port}: Connection refused" in str(info.value)


def test_cli_with_unreachable_address_stops_before_any_work(capsys, monkeypatch, tmp_path: Path) -> None:
    """`evo-subens run ... --address <dead>` exits with code 2 naming workers.address, before training."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("ray.is_initialized", lambda: False)  # as in a fresh CLI process
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, {"workers": {"executor": "ray"}})))
    code = main(["run", str(config), f"output_dir={tmp_path / 'runs'}", "--address", f"127.0.0.1:{_free_port()}"])
    assert code == 2
    assert "config field 'workers.address'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers, field", [
    ({"placement": "strict"}, "workers.placement"),
    ({"resources": {"CPU": 1}}, "workers.resources.CPU"),
    ({"resources": {"accel": 0}}, "workers.resources.accel"),
    ({"resources": {"accel": "one"}}, "workers.resources.accel"),
    ({"resources": ["accel"]}, "workers.resources"),
])
def test_workers_fields_are_validated(workers: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"workers={yaml.safe_dump(workers, default_flow_style=True).strip()}"])
    assert info.value.field == field


def test_placeable_actors_counts_per_node() -> None:
    """Totals can be enough while no node holds an actor: 2 nodes x 1 CPU hold no 2-CPU actor."""
    nodes = [{"Alive": True, "Resources": {"CPU": 1.0, "accel": 1.0}},
             {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "accel": 8.0}}]
    assert placeable_actors({"CPU": 1.0}, nodes) == 4
    assert placeable_actors({"CPU": 2.0}, nodes) == 1
    assert placeable_actors({"CPU": 1.0, "accel": 1.0}, nodes) == 1
    assert placeable_actors({"CPU": 1.0, "accel": 0.5}, nodes) == 1


def test_relative_output_dir_is_refused_in_a_ray_job(monkeypatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_output_dir("runs")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    check_output_dir("/shared/runs")
    with pytest.raises(ConfigError) as info:
        check_output_dir("runs")
    assert info.value.field == "output_dir"


def _payload(tiny_config, tmp_path: Path):
    from test_search import payload_and_genomes

    return payload_and_genomes(tiny_config(tmp_path), 4)


@pytest.mark.ray
def test_unplaceable_custom_resource_is_refused(ray_session, tiny_config, tmp_path: Path) -> None:
    """Actors asking for a resource no node has would wait forever; refused naming workers.resources."""
    payload, _ = _payload(tiny_config, tmp_path)
    for workers in (WorkersConfig(num_actors=1, resources={"no_such_accelerator": 1}),
                    WorkersConfig(num_actors=1, resources={"no_such_accelerator": 1}, placement="spread")):
        with pytest.raises(ConfigError) as info:
            make_problem(workers, payload, fitness="accuracy", population=4)
        assert info.value.field == "workers.resources"
    with pytest.raises(ConfigError) as info:  # 2 CPUs in all, but no actor of 3 threads fits
        make_problem(WorkersConfig(num_actors=1, threads_per_actor=3), payload, fitness="accuracy", population=4)
    assert info.value.field == "workers.num_actors"


@pytest.mark.ray
@pytest.mark.slow
def test_placement_group_actors_report_their_node(ray_session, tiny_config, tmp_path: Path) -> None:
    """placement: pack puts the actors in a placement group; each candidate names its node; closing the
    problem gives the group back."""
    from ray.util import placement_group_table

    payload, genomes = _payload(tiny_config, tmp_path)
    problem = make_problem(WorkersConfig(num_actors=2, placement="pack"), payload, fitness="accuracy",
                           population=len(genomes))
    group = problem.placement_group
    try:
        assert group is not None and placement_group_table(group)["strategy"] == "PACK"
        batch = problem.make_batch(genomes)
        problem.evaluate(batch)
        evals = batch.evals.cpu().numpy()
        nodes = {problem.worker_node(int(row[4]), int(row[5])) for row in evals}
        here = ray_session.get_runtime_context().get_node_id(), ray_session.util.get_node_ip_address()
        assert nodes == {here}  # (node id, its IP): the one node of the session's Ray
    finally:
        problem.close()
    assert placement_group_table(group)["state"] == "REMOVED"


@pytest.mark.slow
def test_in_process_candidates_are_on_node_local(make_config) -> None:
    result = evo_subens.run(make_config({"search": {"generations": 1}}), progress=lambda line: None)
    assert (result.population["node"] == LOCAL_NODE).all()


# --- a real two-node cluster on this machine ----------------------------------------------------------


def _cluster_processes(temp_dir: str) -> list[int]:
    """Processes that name the cluster's own temp dir in their command line, or (Ray's agents, which rename
    themselves ray::...) hold files open in it: exactly the ones it started."""
    folder = re.compile(re.escape(temp_dir))
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and int(entry.name) != os.getpid() and mentions(int(entry.name), folder)]


def _node_processes(temp_dir: str) -> set[int]:
    """The cluster's own long-lived processes (GCS, raylets, dashboard, log monitors, agents), leaving out
    its worker processes, which Ray itself starts and ends as jobs come and go."""
    names = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "Agent")
    found = set()
    for pid in _cluster_processes(temp_dir):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(name in command for name in names) and "default_worker" not in command:
            found.add(pid)
    return found


def _stop_cluster(temp_dir: str) -> None:
    """Stop this cluster only (``ray stop`` would stop every Ray on the machine)."""
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        pids = _cluster_processes(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + pause
        while pids and time.monotonic() < deadline and _cluster_processes(temp_dir):
            time.sleep(0.1)


def test_join_errors_name_the_missing_token_setting(tmp_path: Path) -> None:
    """Ray refuses a driver without token authentication, without a token or with another token alike
    ("failed to connect"): the error names which of this process's settings is missing."""
    token = tmp_path / "token"
    token.write_text("x" * 64)
    assert "RAY_AUTH_MODE=token" in token_settings({"RAY_AUTH_TOKEN_PATH": str(token)}, home=tmp_path)
    assert "has no token" in token_settings({"RAY_AUTH_MODE": "token"}, home=tmp_path)
    missing = token_settings({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    assert "RAY_AUTH_TOKEN_PATH" in missing and "does not exist" in missing
    given = token_settings({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, home=tmp_path)
    assert str(token) in given and "must be the one the cluster was started with" in given


def test_lost_head_ends_the_driver_with_one_line(tmp_path: Path) -> None:
    """A head that stops accepting connections ends the driver within the watch's bound: exit code 3 and one
    line naming the cluster and the command that continues the run, no traceback."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = ("import time; from evo_subens.core.cluster import HeadWatch; "
            f"HeadWatch('127.0.0.1:{port}', 'evo-subens resume runs/x', interval=0.2, lost_after=1.0).start(); "
            "print('watching', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    out = Lines(proc.stdout, beside=err)
    try:
        out.until("watching", timeout=120)
        time.sleep(1.0)
        assert proc.poll() is None  # the head answers: the watch waits
        server.close()
        lost = time.monotonic()
        assert proc.wait(timeout=10) == 3
        assert time.monotonic() - lost < 5
        err = err.rest(timeout=30).strip().splitlines()
        assert len(err) == 1 and f"lost the Ray cluster at 127.0.0.1:{port}" in err[0]
        assert err[0].endswith("continue it with: evo-subens resume runs/x")
    finally:
        proc.kill()
        server.close()


README_HEAD = "head:6379"  # how the README's recipe names the head node's address


def _readme_block(after: str) -> list[list[str]]:
    """The commands of the first ```bash block after the README line starting with ``after``, split like a
    shell would, without comments; continued lines joined."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("\n" + after)
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    body = body[:body.index("```")].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in body.splitlines() if shlex.split(line, comments=True)]


def cluster_recipe() -> dict:
    """The README's cluster recipe: environment exports, the head's and the other nodes' `ray start`
    arguments, and the `evo-subens run` arguments."""
    recipe: dict = {"env": {}, "workers": []}
    for words in _readme_block("## On a Ray cluster"):
        if words[0] == "export":
            recipe["env"].update(word.split("=", 1) for word in words[1:])
        elif words[:2] == ["ray", "start"] and "--head" in words:
            recipe["head"] = words[2:]
        elif words[:2] == ["ray", "start"]:
            recipe["workers"].append(words[2:])
        elif words[0] == "evo-subens":
            recipe["run"] = words[1:]
    return recipe


def _at(words: list[str], address: str, port: int) -> list[str]:
    """Recipe words pointed at this cluster: the head's address and port."""
    return [address if w == README_HEAD else str(port) if w == README_HEAD.split(":")[1] else w for w in words]


class Cluster:
    """A head node and a worker node on loopback, started by the README's recipe (its environment and
    `ray start` lines), each with its own temp dir, and the token in a file of its own."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="evs-ray-", dir="/tmp")
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.recipe = cluster_recipe()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
        self.env.update(self.recipe["env"])
        self.env.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = _free_port() if importlib.util.find_spec("aiohttp") else None

    def _ray_start(self, *args: str) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", self.temp_dir,
                  "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                  "--disable-usage-stats"]
        done = subprocess.run([str(RAY_BIN), "start", *args, *common], env=self.env, capture_output=True,
                              text=True, timeout=90, start_new_session=True)
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def start(self) -> None:
        if self.dashboard_port is None:
            dashboard = ["--include-dashboard", "false"]
        else:
            dashboard = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dashboard_port)]
        self._ray_start(*_at(self.recipe["head"], self.address, self.port), *dashboard)
        for words in self.recipe["workers"]:
            self._ray_start(*_at(words, self.address, self.port))

    def node_ids(self) -> set[str]:
        done = subprocess.run([str(RAY_BIN), "status", "--address", self.address], env=self.env,
                              capture_output=True, text=True, timeout=60)
        return set(re.findall(r"node_([0-9a-f]{56})", done.stdout))

    def kill_head(self) -> None:
        """SIGKILL the head node's GCS and raylet (the raylet that holds Ray's head resource) and what they
        started."""
        pids = [int(pid) for pattern in (f"gcs_server.*{self.temp_dir}", f"raylet.*{self.temp_dir}.*__internal_head__")
                for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]
        assert len(pids) == 2, pids
        for pid in [*pids, *[child for pid in pids for child in descendants(pid)]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def kill_worker_node(self) -> None:
        """SIGKILL the worker node's raylet (the raylet without Ray's head resource) and what it started: its
        workers (our actors among them) and agents."""
        pids = [int(pid) for pid in subprocess.run(["pgrep", "-f", f"raylet.*{self.temp_dir}"], capture_output=True,
                                                   text=True).stdout.split()
                if b"__internal_head__" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(pids) == 1, pids
        for pid in [*pids, *descendants(pids[0])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def add_worker_node(self) -> None:
        """Start the README recipe's other node again and wait until the head counts it."""
        for words in self.recipe["workers"]:
            self._ray_start(*_at(words, self.address, self.port))
        deadline = time.monotonic() + 60
        while len(self.node_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(self.node_ids()) == 2, "the restarted worker node did not join the head"

    def stop(self) -> None:
        _stop_cluster(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A running two-node cluster, stopped (its processes only) however the tests end."""
    if not RAY_BIN.exists():
        pytest.skip(f"no `ray` executable beside {sys.executable}")
    cluster = Cluster()
    try:
        cluster.start()
        deadline = time.monotonic() + 30
        while len(cluster.node_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(cluster.node_ids()) == 2, "the worker node did not join the head"
        yield cluster
    finally:
        cluster.stop()


# The README's run line sets where actors go (workers.placement); the config only what a tiny search needs.
CLUSTER_SEARCH = {"workers": {"executor": "ray"}, "search": {"population": 4, "generations": 1}}
CLUSTER_RUN = {"workers": {"executor": "ray", "num_actors": 2, "placement": "spread"},
               "search": {"population": 4, "generations": 1}}


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_search_runs_on_both_nodes(cluster: Cluster, cli_command, tmp_path: Path) -> None:
    """The README's `evo-subens run` line against the cluster its recipe started (token authentication on)
    evaluates candidates on both nodes; a driver without RAY_AUTH_MODE=token is refused, naming it."""
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    refused = subprocess.run([str(RAY_BIN), "status", "--address", cluster.address], capture_output=True,
                             text=True, timeout=60, env=dict(cluster.env, RAY_AUTH_TOKEN_PATH=str(wrong)))
    assert refused.returncode != 0 and "token" in refused.stderr.lower()  # the cluster enforces its token
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, CLUSTER_SEARCH)))
    command = [*cli_command, *[str(config) if w == "configs/default.yaml" else w
                               for w in _at(cluster.recipe["run"], cluster.address, cluster.port)],
               f"output_dir={tmp_path / 'runs'}"]
    plain = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    lacking = subprocess.run([*command, "name=no-mode"], env=plain, capture_output=True, text=True, timeout=240)
    assert lacking.returncode == 2 and "export RAY_AUTH_MODE=token" in lacking.stderr, lacking.stderr[-3000:]
    done = subprocess.run([*command, "name=cluster"], env=cluster.env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    population = evo_subens.load_population(tmp_path / "runs" / "cluster")  # written on the driver's disk
    population = population[population["generation"] >= 0]  # without the parent's row, scored on the driver
    assert len(population) == 4
    assert population["node"].str.fullmatch(NODE_ID.pattern).all()
    assert set(population["node"]) == cluster.node_ids()  # both nodes evaluated candidates
    assert population["host"].str.fullmatch(r"\d+\.\d+\.\d+\.\d+").all()  # readable beside the node id
    # workers.num_actors left out: one actor per CPU of the cluster (2 nodes x 2 CPUs)
    assert re.search(r"\[workers\] evaluating 4 Ray actors on cpu, node \S+ \(4\)", done.stdout), done.stdout
    # A driver that joined the cluster and is SIGKILLed mid-search takes none of the cluster's processes along.
    before = _node_processes(cluster.temp_dir)
    proc = subprocess.Popen([*command, "name=killed", "search.generations=200"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(cluster.env, PYTHONUNBUFFERED="1"))
    try:
        Lines(proc.stdout).until("[search] generation 1 (2 of")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    time.sleep(5)  # longer than a reaper takes to end what it recorded
    assert before and before <= _node_processes(cluster.temp_dir)
    assert len(cluster.node_ids()) == 2


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_lost_head_stops_the_run_and_resume_finishes_it(cli_command, tmp_path: Path) -> None:
    """The head's GCS and raylet SIGKILLed mid-search: the driver ends within the head watch's bound (exit
    code 3, one line naming the cluster and how to resume, no traceback); `resume` on a Ray of this machine
    ends with the same population log, members and metrics as an uninterrupted run."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, {"workers": {"executor": "ray", "num_actors": 2},
                                                       "search": {"population": 8, "generations": 40}})))
    cluster, proc = Cluster(), None
    try:
        cluster.start()
        proc = subprocess.Popen([*cli_command, "run", str(config), f"output_dir={tmp_path / 'runs'}", "name=headless",
                                 "--address", cluster.address], env=dict(cluster.env, PYTHONUNBUFFERED="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = Lines(proc.stderr)
        Lines(proc.stdout, beside=errors).until("[search] generation 1 (2 of")
        cluster.kill_head()
        killed = time.monotonic()
        assert proc.wait(timeout=60) == 3, errors.rest(timeout=30)[-3000:]
        print(f"driver ended {time.monotonic() - killed:.1f} s after the head was killed")
        assert time.monotonic() - killed < 30
        err = errors.rest(timeout=30)
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert "lost the Ray cluster at" in last and f"evo-subens resume {tmp_path / 'runs' / 'headless'}" in last
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.stop()
    assert _cluster_processes(cluster.temp_dir) == []  # nothing the test started survives it
    plain = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    resumed = subprocess.run([*cli_command, "resume", str(tmp_path / "runs" / "headless"), "workers.address=null"],
                             env=plain, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = subprocess.run([*cli_command, "run", str(config), f"output_dir={tmp_path / 'runs'}", "name=straight",
                                "workers.executor=local"], env=plain, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    _assert_same_run(tmp_path / "runs" / "headless", tmp_path / "runs" / "straight")


def _run_until_killed(command: list[str], env: dict, kill, started: list[subprocess.Popen]
                      ) -> tuple[subprocess.Popen, Lines, Lines, float]:
    """Start ``command`` (added to ``started``), call ``kill()`` once its search has run two generations:
    the process, its stdout and stderr, and when ``kill()`` returned."""
    proc = subprocess.Popen(command, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started.append(proc)
    err = Lines(proc.stderr)
    out = Lines(proc.stdout, beside=err)
    out.until("[search] generation 1 (2 of")
    kill()
    return proc, out, err, time.monotonic()


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_lost_worker_node(cli_command, tmp_path: Path) -> None:
    """The worker node's raylet and workers SIGKILLed mid-search. With a spread placement group the lost actor
    is restarted on the head, the run says which candidates its new process evaluated and ends identical to
    an uninterrupted run. With an actor per CPU of both nodes there is no room left: after
    workers.lost_nodes_wait the run stops with exit code 3 naming workers.num_actors, and `resume` with
    fewer actors on what is left ends identical too."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, {"workers": {"executor": "ray"},
                                                       "search": {"population": 8, "generations": 60}})))
    runs = tmp_path / "runs"
    plain = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    reference = subprocess.run([*cli_command, "run", str(config), f"output_dir={runs}", "name=straight",
                                "workers.executor=local"], env=plain, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    cluster, drivers = Cluster(), []
    try:
        cluster.start()
        base = [*cli_command, "run", str(config), f"output_dir={runs}", "--address", cluster.address]
        proc, out, err, _ = _run_until_killed([*base, "name=spread", "workers.num_actors=2", "workers.placement=spread"],
                                              cluster.env, cluster.kill_worker_node, drivers)
        assert proc.wait(timeout=300) == 0, err.rest(timeout=30)[-3000:]
        out = out.rest(timeout=30)
        assert re.search(r"\[workers\] actor-\d was lost \(pid \d+\) and restarted; .*evaluated candidate\(s\) \d+",
                         out), out[-3000:]
        _assert_same_run(runs / "spread", runs / "straight")

        cluster.add_worker_node()
        proc, out, err, killed = _run_until_killed([*base, "name=full", "workers.num_actors=4",
                                                    "workers.lost_nodes_wait=5"], cluster.env, cluster.kill_worker_node,
                                                   drivers)
        code = proc.wait(timeout=120)
        print(f"driver ended {time.monotonic() - killed:.1f} s after the worker node was killed")
        err = err.rest(timeout=30)
        assert code == 3, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert "has lost nodes" in last and "workers.num_actors" in last and "Traceback" not in err
        resumed = subprocess.run([*cli_command, "resume", str(runs / "full"), "workers.num_actors=2", "--address",
                                  cluster.address], env=cluster.env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_same_run(runs / "full", runs / "straight")
    finally:
        for proc in drivers:
            if proc.poll() is None:
                proc.kill()
        cluster.stop()
    assert _cluster_processes(cluster.temp_dir) == []  # nothing the test started survives it


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_recipe(cluster: Cluster, tmp_path: Path) -> None:
    """The README's `ray job submit` line, as written: configs/ray/runtime_env.yaml ships this checkout; the
    job's driver (on the head node) writes the run directory to an absolute output_dir."""
    if cluster.dashboard_port is None:
        pytest.skip("`ray job submit` needs Ray's job server, which needs `pip install 'ray[default]'` "
                    "(aiohttp is not installed)")
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, CLUSTER_RUN)))
    submit, = _readme_block("As a Ray job")
    submit = [str(RAY_BIN) if w == "ray" else f"http://127.0.0.1:{cluster.dashboard_port}" if w == "http://head:8265"
              else str(config) if w == "configs/default.yaml" else f"output_dir={tmp_path / 'runs'}"
              if w.startswith("output_dir=") else w for w in submit]
    done = subprocess.run([*submit, "name=job"], cwd=repo, env=cluster.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    population = evo_subens.load_population(tmp_path / "runs" / "job")
    population = population[population["generation"] >= 0]  # the parent's reference row is scored locally
    assert set(population["node"]) == cluster.node_ids()
