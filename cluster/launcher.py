"""A real multi-node Ray cluster on loopback: one `ray start --block` process per simulated node.

Each node is its own process group (started with a new session), declaring the resources and labels
of its pool from `cluster.ray_mapping`, so Ray's scheduler sees GPUs and TPUs this machine does not
have. We stop exactly the process groups we started, by pid, never by name, and only while the pid's
start time and the machine's boot id still match the record: once a cluster dies without `llmos down`,
its pids go to other processes. Ray's token authentication stays on: the cluster gets its own token file,
and every process llmos starts or connects with is pointed at it (`RAY_AUTH_MODE=token`,
`RAY_AUTH_TOKEN_PATH`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.console import UserError
from cluster.ray_mapping import NodeDeclaration, head_declaration, local_cluster_nodes, replica_nodes
from cluster.spec import ClusterSpec

DEFAULT_HEAD_IP = "127.0.0.2"  # a loopback alias Ray does not rewrite to the machine's eth0 address
DEFAULT_GCS_PORT = 6380
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_OBJECT_STORE_MB = 128
RAY_MIN_OBJECT_STORE_MB = 75  # Ray refuses to start a node with less (78,643,200 bytes)
NODE_START_TIMEOUT_S = 90.0
WORKER_START_ATTEMPTS = 3
PARALLEL_NODE_STARTS = 4
NODE_STOP_TIMEOUT_S = 20.0
_STARTED_MARKER = "Ray runtime started"


def llmos_home() -> Path:
    return Path(os.environ.get("LLMOS_HOME", Path.home() / ".llmos"))


def controller_state_dir(home: Path, cluster: str) -> Path:
    """Where a cluster's controller journals unless told otherwise, under an `LLMOS_HOME`."""
    return home / "controller" / cluster


class NodeProcess(BaseModel):
    """One simulated node: the pid of its `ray start --block` process, which leads its process group."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pool: str
    pid: int
    log_path: str
    declaration: dict
    # What proves `pid` still names this process: its start time (clock ticks since boot, field 22 of
    # /proc/PID/stat) and the boot it started in. None in records of older llmos, which prove nothing.
    start_ticks: int | None = None
    boot_id: str | None = None


class LocalClusterRecord(BaseModel):
    """What `llmos up` started, persisted so `status` and `down` find it from any shell."""

    model_config = ConfigDict(extra="forbid")

    cluster_name: str
    spec: dict
    head_ip: str
    gcs_port: int
    dashboard_port: int
    temp_dir: str
    token_path: str
    object_store_bytes: int
    nodes: list[NodeProcess]
    started_at: float
    # GCS fault tolerance: the Redis server the head's GCS keeps its tables in (None: in memory).
    redis_address: str | None = None
    # Temp dirs of earlier head processes (see `restart_head`), removed with the cluster.
    stale_temp_dirs: list[str] = []


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


PORTS_REMEMBERED = 4096
_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before by this process: nodes starting at once each take a few, and
    the kernel may offer a port again once its probe is closed, before the node that got it binds it."""
    with _ports_lock:
        if len(_ports_handed_out) > PORTS_REMEMBERED:
            _ports_handed_out.clear()  # long since bound by their nodes, or given back
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on; None once the pid is gone. Split after the last `)`:
    the command name before it may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22


def _own_state(node: NodeProcess) -> str | None:
    """The state letter (R, S, Z...) of the node's process while its pid provably still names the process
    llmos started, else None. Once that process has died (OOM kill, reboot) the kernel hands its pid to any
    new process; only the same boot and the same start time tell ours apart."""
    if node.start_ticks is None or node.boot_id is None or node.boot_id != _boot_id():
        return None
    fields = _stat_fields(node.pid)
    if fields is None or int(fields[19]) != node.start_ticks:
        return None
    return fields[0]


def _running(node: NodeProcess) -> bool:
    # A zombie is still ours, but no longer a running node.
    return _own_state(node) not in (None, "Z")


def _stoppable(node: NodeProcess) -> bool:
    """Whether signalling the node's process group reaches only processes llmos started: its leader is
    provably ours, or the leader (recorded in this boot) is gone while its group lives on. Linux hands out
    no pid that a live process group still has as its id, so those members are the node's own."""
    if _own_state(node) is not None:
        return True
    return (
        node.start_ticks is not None
        and node.boot_id == _boot_id()
        and _stat_fields(node.pid) is None
        and bool(_group_members(node.pid))
    )


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def group_memory_bytes(pgid: int) -> int:
    """Proportional set size (PSS) of a node's process group: shared pages split fairly, so summing
    nodes gives the cluster's real footprint (RSS would count Ray's shared libraries once per process)."""
    total = 0
    for pid in _group_members(pgid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def _stop_groups(nodes: list[NodeProcess], timeout_s: float) -> None:
    """SIGTERM each node's group leader (Ray shuts its children down), then SIGKILL whatever is left of its
    group: only groups `_stoppable` proves llmos started, so a pid the kernel has handed on is never signalled."""
    stoppable = [node for node in nodes if _stoppable(node)]
    for node in stoppable:
        if _own_state(node) is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_group_members(node.pid) for node in stoppable):
        time.sleep(0.2)
    for node in stoppable:
        # Asked again: a group that emptied during the wait frees its id for any new process.
        if _stoppable(node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(node.pid, os.WNOHANG)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalCluster:
    """A running local cluster, found through its record in `$LLMOS_HOME/local-cluster.json`."""

    def __init__(self, home: Path, record: LocalClusterRecord):
        self.home = home
        self.record = record
        self._record_lock = threading.Lock()  # nodes start from several threads at once
        # Set when the cluster goes down, or when a start failed or was interrupted: no node starts after it.
        self._stopping = threading.Event()
        self._down = False

    # -- finding and describing -------------------------------------------------------------

    @staticmethod
    def record_path(home: Path) -> Path:
        return home / "local-cluster.json"

    @classmethod
    def find(cls, home: Path | None = None) -> LocalCluster | None:
        home = home or llmos_home()
        path = cls.record_path(home)
        if not path.exists():
            return None
        try:
            record = LocalClusterRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            raise UserError(
                f"{path} is not a record of a local cluster this llmos started (another version wrote it, or "
                "something else did); if that cluster is stopped, delete the file, else stop it with the llmos "
                "that started it, or set LLMOS_HOME to another folder"
            ) from None
        return cls(home, record)

    @classmethod
    def attach(cls, home: Path | None = None) -> LocalCluster:
        cluster = cls.find(home)
        if cluster is None:
            raise UserError("no local llmos cluster is running; start one with `llmos up examples/cluster.yaml`")
        return cluster

    @property
    def spec(self) -> ClusterSpec:
        return ClusterSpec.model_validate(self.record.spec)

    @property
    def gcs_address(self) -> str:
        return f"{self.record.head_ip}:{self.record.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.record.dashboard_port}"

    def submit_job(self, entrypoint: str, working_dir: Path, timeout_s: float = 60.0) -> str:
        """`ray job submit --working-dir WORKING_DIR -- ENTRYPOINT` through Ray's JobSubmissionClient; the
        submission id. Ray's job server answers "No available agent to submit job, please try again later"
        when the head's dashboard agent has not answered within 10 s, as on a loaded 2-core machine: that
        answer is retried until `timeout_s`."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir)})
            except RuntimeError as error:
                if "try again later" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def client_env(self) -> dict[str, str]:
        """Environment a client (driver, `ray job submit`, the admin API) needs to reach this cluster."""
        return {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.record.token_path,
        }

    def _save(self) -> None:
        if self._down:
            return  # `down` removed the record; a start it stopped must not write it back
        path = self.record_path(self.home)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.record.model_dump_json(indent=2))
        tmp.replace(path)

    def node(self, name: str) -> NodeProcess:
        for node in self.record.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.record.nodes)
        raise UserError(f"no local node named {name!r}; nodes: {names}")

    def node_alive(self, name: str) -> bool:
        return _running(self.node(name))

    def memory_by_node(self) -> dict[str, int]:
        return {node.name: group_memory_bytes(node.pid) for node in self.record.nodes if _running(node)}

    # -- starting -------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        spec: ClusterSpec,
        *,
        home: Path | None = None,
        replicas_per_pool: int = 1,
        head_ip: str = DEFAULT_HEAD_IP,
        gcs_port: int = DEFAULT_GCS_PORT,
        dashboard_port: int = DEFAULT_DASHBOARD_PORT,
        object_store_mb: int = DEFAULT_OBJECT_STORE_MB,
        redis_address: str | None = None,
        on_progress: Callable[[str], None] = lambda message: None,
    ) -> LocalCluster:
        """Start the head, then every node of the spec's pools, several at once.

        With `redis_address` the head's GCS keeps its tables in that Redis server (Ray's GCS fault
        tolerance, what KubeRay's `gcsFaultToleranceOptions` sets up), so `restart_head` keeps the cluster.
        """
        home = home or llmos_home()
        home.mkdir(parents=True, exist_ok=True)
        existing = cls.find(home)
        if existing is not None:
            if any(_running(node) for node in existing.record.nodes):
                raise UserError(
                    f"a local cluster ({existing.record.cluster_name}, {len(existing.record.nodes)} nodes) "
                    f"is already running from {home}; stop it with `llmos down` first"
                )
            on_progress(f"the cluster {existing.record.cluster_name} recorded in {home} no longer runs; removing it")
            existing.down(on_progress=on_progress)
        for host, port, flag in (
            (head_ip, gcs_port, "--port"),
            ("127.0.0.1", dashboard_port, "--dashboard-port"),
        ):
            if _port_in_use(host, port):
                raise UserError(f"port {port} on {host} is in use; stop whatever holds it or choose another {flag}")
        if replicas_per_pool < 1:
            raise UserError("--nodes-per-pool must be at least 1")

        token_path = home / "auth_token"
        if not token_path.exists():
            token_path.touch(mode=0o600)
            token_path.write_text(secrets.token_hex(32))
        os.chmod(token_path, 0o600)
        # Short on purpose: Ray's unix socket paths live under it and must stay under 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="llmos-")
        record = LocalClusterRecord(
            cluster_name=spec.name,
            spec=spec.model_dump(mode="json"),
            head_ip=head_ip,
            gcs_port=gcs_port,
            dashboard_port=dashboard_port,
            temp_dir=temp_dir,
            token_path=str(token_path),
            object_store_bytes=object_store_mb * 1024 * 1024,
            nodes=[],
            started_at=time.time(),
            redis_address=redis_address,
        )
        cluster = cls(home, record)
        cluster._save()
        try:
            workers = local_cluster_nodes(spec, replicas_per_pool)
            on_progress(f"starting head node on {cluster.gcs_address} (dashboard {cluster.dashboard_url})")
            cluster._start_node(head_declaration(spec), head=True)
            on_progress(f"starting {len(workers)} nodes: {', '.join(d.name for d in workers)}")
            cluster._start_workers(workers, on_progress)
        except BaseException:
            cluster.down()
            raise
        return cluster

    def _node_env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        # The caller's llmos credential stays with the caller: every job on every node would inherit it.
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_CREDENTIAL")}
        return {
            **inherited,
            # Jobs submitted to this cluster run the `python` on the raylet's PATH: the project's venv.
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.record.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Each train.report() waits on a controller poll; 2 s by default makes small runs crawl.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        }

    def _start_workers(self, declarations: list[NodeDeclaration], on_progress: Callable[[str], None]) -> None:
        """Start worker nodes, several at once (each in a Ray temp dir of its own). On the first failure, or an
        interrupt, no further start begins and those under way stop; the first failure is raised."""
        started = 0
        failures: list[BaseException] = []

        def start(declaration: NodeDeclaration) -> None:
            nonlocal started
            try:
                self._start_node(declaration, head=False, on_progress=on_progress)
            except BaseException as failure:
                with self._record_lock:
                    if not self._stopping.is_set():
                        failures.append(failure)  # the first: those it stops fail after it
                self._stopping.set()
                raise
            with self._record_lock:
                started += 1
                on_progress(f"node {declaration.name} (pool {declaration.pool}) joined: {started}/{len(declarations)}")

        starts = ThreadPoolExecutor(max_workers=PARALLEL_NODE_STARTS, thread_name_prefix="llmos-up")
        try:
            wait([starts.submit(start, declaration) for declaration in declarations], return_when=FIRST_EXCEPTION)
        except BaseException:  # interrupted: the starts under way stop, and the caller takes the cluster down
            self._stopping.set()
            raise
        finally:
            if self._stopping.is_set():
                on_progress("stopping the node starts under way")
            starts.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise failures[0]

    def _start_node(
        self,
        declaration: NodeDeclaration,
        *,
        head: bool,
        on_progress: Callable[[str], None] = lambda message: None,
    ) -> NodeProcess:
        """Start one node and wait until Ray says it runs; a failed start leaves no process and no record.

        A worker whose start fails is started again, up to `WORKER_START_ATTEMPTS` times: on a loaded
        machine a raylet can die or miss Ray's fixed 30 s registration window, and the next try
        usually joins. A head is tried once: `ray start --head` refuses a port its temp dir says a cluster uses.
        """
        attempts = 1 if head else WORKER_START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            node, process = self._spawn_node(declaration, head=head, attempt=attempt)
            failure = self._wait_started(node, process)
            if failure is None:
                return node
            _stop_groups([node], NODE_STOP_TIMEOUT_S)
            with self._record_lock:
                self.record.nodes.remove(node)
                self._save()
            if self._stopping.is_set():
                raise UserError(failure)
            if attempt < attempts:
                on_progress(f"{failure}; starting it again (attempt {attempt + 1} of {attempts})")
        tried = f" (attempt {attempts} of {attempts})" if attempts > 1 else ""
        raise UserError(f"{failure}{tried}; its log ends:\n{_log_tail(node.log_path)}\nthe whole log: {node.log_path}")

    def _spawn_node(
        self, declaration: NodeDeclaration, *, head: bool, attempt: int
    ) -> tuple[NodeProcess, subprocess.Popen]:
        ray_cli = str(Path(sys.executable).parent / "ray")
        args = [
            ray_cli,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            self.record.head_ip,
            "--num-cpus",
            str(int(declaration.resources.get("CPU", 0))),
            "--num-gpus",
            str(int(declaration.resources.get("GPU", 0))),
            "--memory",
            str(int(declaration.resources["memory"])),
            "--object-store-memory",
            str(self.record.object_store_bytes),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
        ]
        if declaration.custom_resources:
            args += ["--resources", json.dumps(declaration.custom_resources)]
        if declaration.user_labels:
            args += ["--labels", ",".join(f"{k}={v}" for k, v in declaration.user_labels.items())]
        if head:
            args += [
                "--head",
                "--port",
                str(self.record.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.record.dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
            ]
            ray_temp_dir = self.record.temp_dir
        else:
            args += ["--address", self.gcs_address]
            # A temp dir of its own, as on a machine of its own: Ray unpacks a job's working_dir into its
            # temp dir on every node at once, and nodes sharing one replaced the files under each
            # other's running workers (a Ray Train controller died importing torch from it).
            ray_temp_dir = tempfile.mkdtemp(prefix="n", dir=self.record.temp_dir)  # short: Ray's socket paths
        args += ["--temp-dir", ray_temp_dir]
        env = self._node_env()
        if head and self.record.redis_address:
            env["RAY_REDIS_ADDRESS"] = self.record.redis_address
            # One cluster's tables in Redis: a head restarted later finds exactly these.
            env["RAY_external_storage_namespace"] = f"{self.record.cluster_name}-{int(self.record.started_at)}"
        if declaration.reserved_labels:
            # `--labels` refuses keys under ray.io/; Ray reads them from this variable instead.
            env["RAY_OVERRIDE_LABELS"] = json.dumps(declaration.reserved_labels)
        # In LLMOS_HOME, not Ray's temp dir, which `down` removes: a node that failed to start, and took the
        # whole cluster's start with it, is explained there.
        log_path = self.home / "logs" / f"{declaration.name}.log"
        log_path.parent.mkdir(exist_ok=True)
        # Under the lock `down` takes: a node is either in the record it stops, or never started.
        with self._record_lock:
            if self._stopping.is_set():
                raise UserError(f"node {declaration.name} not started: the cluster is stopping")
            node, process = self._popen_node(declaration, args, env, log_path, ray_temp_dir, attempt)
            self.record.nodes.append(node)
            self._save()
        return node, process

    def _popen_node(
        self,
        declaration: NodeDeclaration,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        ray_temp_dir: str,
        attempt: int,
    ) -> tuple[NodeProcess, subprocess.Popen]:
        # A node started again under an old name (after `remove_node`) starts a fresh log.
        with open(log_path, "wb" if attempt == 1 else "ab") as log:
            started = f"--- llmos: attempt {attempt} to start {declaration.name}, Ray's temp dir {ray_temp_dir}\n"
            log.write(started.encode())
            log.flush()
            process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        node = NodeProcess(
            name=declaration.name,
            pool=declaration.pool,
            pid=process.pid,
            log_path=str(log_path),
            declaration={"resources": declaration.resources, "labels": declaration.labels},
            # Read before anything reaps the child: until then its /proc entry stays, even if it exited.
            start_ticks=_start_ticks(process.pid),
            boot_id=_boot_id(),
        )
        return node, process

    def _wait_started(self, node: NodeProcess, process: subprocess.Popen) -> str | None:
        """None once the node runs, else why it did not."""
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                return f"the start of node {node.name} was stopped"
            if process.poll() is not None:
                return f"node {node.name} exited during start (code {process.returncode})"
            if _STARTED_MARKER in Path(node.log_path).read_text(errors="replace"):
                return None
            time.sleep(0.2)
        return f"node {node.name} did not start within {NODE_START_TIMEOUT_S:.0f}s"

    # -- changing and stopping --------------------------------------------------------------------

    def add_replica(
        self, pool_name: str, on_progress: Callable[[str], None] = lambda message: None
    ) -> list[NodeProcess]:
        """Start one more replica of a pool (a node, or every host of a TPU slice): all of it, or none."""
        pool = self.spec.pool(pool_name)
        taken = {node.name for node in self.record.nodes}
        replica = 0
        while any(d.name in taken for d in replica_nodes(pool, replica)):
            replica += 1
        started: list[NodeProcess] = []
        try:
            for declaration in replica_nodes(pool, replica):
                started.append(self._start_node(declaration, head=False, on_progress=on_progress))
        except BaseException:
            for node in started:
                self.remove_node(node.name)
            raise
        return started

    def remove_node(self, name: str, timeout_s: float = NODE_STOP_TIMEOUT_S, *, crash: bool = False) -> None:
        """Stop one simulated node's processes, as if the machine went away: by SIGTERM, as when Kubernetes
        deletes a pod (the raylet tells Ray it is going), or with `crash` by SIGKILL at once, as when the machine
        loses power (Ray learns of it only when the node's health checks have failed for a while)."""
        node = self.node(name)
        if node.pool == "head":
            raise UserError("the head node cannot be removed on its own; use `llmos down` to stop the cluster")
        if crash and _stoppable(node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGKILL)
        _stop_groups([node], timeout_s)
        self.record.nodes = [n for n in self.record.nodes if n.name != name]
        self._save()

    def restart_head(self, on_progress: Callable[[str], None] = lambda message: None) -> NodeProcess:
        """Kill the head node's processes at once, as a crash would, and start the head again.

        Needs GCS fault tolerance (`redis_address`): the new GCS reloads nodes, actors, placement groups
        and jobs from Redis, the worker nodes reconnect, and what runs on them keeps running. Actors
        of the head node itself (the llmos controller) are restarted by Ray. A driver attached to
        the head node dies with it: disconnect first and connect again after.
        """
        if not self.record.redis_address:
            raise UserError(
                "this cluster keeps its GCS in memory: restarting the head would lose it; "
                "start the cluster with a Redis address for GCS fault tolerance"
            )
        (head,) = [node for node in self.record.nodes if node.pool == "head"]
        on_progress(f"killing {head.name} (pid group {head.pid})")
        if _stoppable(head):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(head.pid, signal.SIGKILL)
        _stop_groups([head], NODE_STOP_TIMEOUT_S)
        self.record.nodes = [node for node in self.record.nodes if node is not head]
        # `ray start --head` refuses a port that its temp dir says a running cluster uses, and on one
        # machine the worker raylets' own flags name that address: the new head gets a new temp dir.
        self.record.stale_temp_dirs.append(self.record.temp_dir)
        self.record.temp_dir = tempfile.mkdtemp(prefix="llmos-")
        self._save()
        on_progress(f"starting {head.name} again on {self.gcs_address}")
        return self._start_node(head_declaration(self.spec), head=True)

    def down(self, timeout_s: float = NODE_STOP_TIMEOUT_S, on_progress: Callable[[str], None] = lambda m: None) -> int:
        """Stop every process group this cluster started: the workers together, then the head. Nodes whose
        pids the record cannot prove still name what llmos started are left alone, and said so. Returns how
        many nodes it stopped."""
        with self._record_lock:
            self._down = True
            self._stopping.set()
            nodes = list(self.record.nodes)
        unproven = [node for node in nodes if not _stoppable(node)]
        if unproven:
            on_progress(
                f"not signalling {', '.join(f'{node.name} (pid {node.pid})' for node in unproven)}: the record "
                "is stale, its pids are not provably the processes llmos started (they exited, the machine "
                "restarted, or an older llmos wrote the record)"
            )
        stoppable = [node for node in nodes if node not in unproven]
        workers = [node for node in stoppable if node.pool != "head"]
        heads = [node for node in stoppable if node.pool == "head"]
        for group in (workers, heads):
            if group:
                on_progress(f"stopping {', '.join(node.name for node in group)}")
                _stop_groups(group, timeout_s)
        for temp_dir in (self.record.temp_dir, *self.record.stale_temp_dirs):
            shutil.rmtree(temp_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.record_path(self.home).unlink()
        return len(stoppable)


@contextlib.contextmanager
def temporary_cluster(
    spec: ClusterSpec,
    *,
    replicas_per_pool: int = 1,
    redis_address: str | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
) -> Iterator[LocalCluster]:
    """A throwaway local cluster for benchmarks and scripts: its own state directory and free ports, with
    `LLMOS_HOME` pointed at it so the admin API finds it; this process's Ray driver (if it connected)
    and every process the cluster started are stopped on exit."""
    home = Path(tempfile.mkdtemp(prefix="llmos-"))
    previous_home = os.environ.get("LLMOS_HOME")
    os.environ["LLMOS_HOME"] = str(home)
    try:
        cluster = LocalCluster.up(
            spec,
            home=home,
            replicas_per_pool=replicas_per_pool,
            redis_address=redis_address,
            gcs_port=free_port(DEFAULT_HEAD_IP),
            dashboard_port=free_port(),
            on_progress=on_progress,
        )
        try:
            yield cluster
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            cluster.down()
            shutil.rmtree(home, ignore_errors=True)  # kept when the start failed: its logs say why
    finally:
        if previous_home is None:
            os.environ.pop("LLMOS_HOME", None)
        else:
            os.environ["LLMOS_HOME"] = previous_home
