"""JobgateSlurmSpawner: batchspawner's SlurmSpawner, reached through a jobgate relay.

The batch job runs ``jobgate agent --access public -- jupyterhub-singleuser ...`` with the
single-user server on a loopback port of the compute node. The agent dials out to the relay
and writes its session URL (``https://<name>.<domain>``) to the job file
``~/.jobgate/jobs/<job id>.json``; ``start()`` reads it (through ``exec_prefix``, as the
user) and hands it to the hub, which proxies ``/user/<name>/`` there. Nothing connects to
the compute node: the hub and its proxy need outbound HTTPS to the relay only.

Access: the session is *public* at the relay (no jobgate access key: the hub's proxy cannot
carry a per-server key), and jupyterhub-singleuser guards every request with the hub's
OAuth, as it does behind any other spawner. See the README for the security model.
"""

import asyncio
import json
import re
import shlex

from batchspawner import JobStatus, SlurmSpawner
from batchspawner.batchspawner import format_template
from traitlets import Float, Integer, Unicode, default

#: How often start() looks at the queue and the job file, in seconds: a new job runs
#: within a second on an idle cluster; the job file is a small read.
POLL_INTERVAL_S = 1.0

#: Longest job file read back (a record is a few hundred bytes).
MAX_JOB_FILE_BYTES = 64 * 1024


def session_url(url, domain, port=0):
    """Returns the session's root URL ``https://<name>.<domain>[:port]`` if ``url`` is one.

    ``url`` comes from a file the job's user controls, and the hub's proxy sends that user's
    server traffic (hub cookies included) wherever it points: only a single-label name
    directly below the relay's domain, on the relay's port, is accepted. Anything else
    returns None.
    """
    if not isinstance(url, str) or not domain:
        return None
    port_part = "" if port in (0, 443) else f":{int(port)}"
    pattern = (
        r"https://([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\."
        + re.escape(domain.lower())
        + re.escape(port_part)
        + r"/?"
    )
    match = re.fullmatch(pattern, url)
    if not match:
        return None
    return f"https://{match.group(1)}.{domain.lower()}{port_part}"


class JobgateSlurmSpawner(SlurmSpawner):
    """A SlurmSpawner whose single-user server is reached through a jobgate relay."""

    jobgate_domain = Unicode(
        "",
        help="The relay's domain (sessions are https://<name>.<domain>). Required: the "
        "URL a job reports is accepted only below it.",
    ).tag(config=True)

    jobgate_port = Integer(
        0,
        help="The relay's HTTPS port in session URLs (0 or 443: none in the URL).",
    ).tag(config=True)

    jobgate_agent_cmd = Unicode(
        "jobgate agent --access public",
        help="The agent command the job runs; the single-user command follows `--`. Add "
        "--relay, --relay-ca, --token-file here or set JOBGATE_* in Spawner.environment.",
    ).tag(config=True)

    jobgate_url_timeout = Float(
        300.0,
        help="Seconds the agent has, once the job runs, to start the server and connect.",
    ).tag(config=True)

    # The server listens on the compute node's loopback only: the agent is its one client.
    ip = Unicode("127.0.0.1", help="Address the single-user server listens at").tag(
        config=True
    )

    # No batchspawner-singleuser: it reports a port for the hub to connect to, and the
    # hub connects to the relay instead.
    batchspawner_singleuser_cmd = Unicode("").tag(config=True)

    jobgate_url = Unicode("", help="The session URL of the running job (state).")

    @default("req_srun")
    def _req_srun_default(self):
        # A job step: scancel sends SIGTERM to the agent, which ends its session at once.
        # --export=ALL: the step gets the batch shell's environment, prologue (module load)
        # included; sbatch's --export={keepvars} would otherwise limit it to the hub's list.
        return "srun --export=ALL"

    def cmd_formatted_for_batch(self):
        """``jobgate agent ... -- jupyterhub-singleuser ... --ServerApp.port={port}``.

        The agent replaces ``{port}`` with a free loopback port; the command line wins
        over the port in JUPYTERHUB_SERVICE_URL (the hub does not know it).
        """
        singleuser = self.cmd + self.get_args()
        singleuser += [
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port={port}",
        ]
        return " ".join([self.jobgate_agent_cmd, "--"] + singleuser)

    async def start(self):
        """Submits the job, waits for it to run and for the agent's URL; returns the URL."""
        if not self.jobgate_domain:
            raise RuntimeError("JobgateSlurmSpawner.jobgate_domain is not set")
        self.ip = self.traits()["ip"].default_value
        self.port = 0
        self.jobgate_url = ""
        await self.submit_batch_script()
        if not self.job_id:
            raise RuntimeError("Jupyter batch job submission failure (no job id)")
        await self._wait_running()
        self.jobgate_url = await self._wait_url()
        self.db.commit()
        self.log.info("Job %s is at %s", self.job_id, self.jobgate_url)
        return self.jobgate_url

    async def _wait_running(self):
        while True:
            status = await self.query_job_status()
            if status == JobStatus.RUNNING:
                return
            if status not in (JobStatus.PENDING, JobStatus.UNKNOWN):
                self.clear_state()
                raise RuntimeError(
                    "The Jupyter batch job ended while pending or right after starting"
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _wait_url(self):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.jobgate_url_timeout
        while loop.time() < deadline:
            record = await self._read_job_file()
            if record.get("state") == "ended":
                raise RuntimeError(
                    f"jobgate agent ended: {record.get('error') or 'no reason given'}"
                )
            url = record.get("url")
            if record.get("state") == "connected" and url:
                root = session_url(url, self.jobgate_domain, self.jobgate_port)
                if root is None:
                    raise RuntimeError(
                        f"the job reported a URL outside https://*.{self.jobgate_domain}"
                    )
                return root
            if await self.query_job_status() != JobStatus.RUNNING:
                raise RuntimeError("The Jupyter batch job ended before its jobgate URL")
            await asyncio.sleep(POLL_INTERVAL_S)
        raise RuntimeError(
            f"no jobgate URL within {self.jobgate_url_timeout:.0f} s of the job starting"
        )

    async def _read_job_file(self):
        """The agent's job file as a dict; {} while absent or unreadable."""
        subvars = self.get_req_subvars()
        path = f"{subvars['homedir']}/.jobgate/jobs/{self.job_id}.json"
        prefix = format_template(self.exec_prefix, **subvars) if self.exec_prefix else ""
        cmd = f"{prefix} cat {shlex.quote(path)}".strip()
        try:
            text = await self.run_command(cmd)
        except RuntimeError:
            return {}
        if len(text) > MAX_JOB_FILE_BYTES:
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def get_state(self):
        state = super().get_state()
        if self.jobgate_url:
            state["jobgate_url"] = self.jobgate_url
        return state

    def load_state(self, state):
        super().load_state(state)
        self.jobgate_url = state.get("jobgate_url", "")

    def clear_state(self):
        super().clear_state()
        self.jobgate_url = ""

    async def progress(self):
        while True:
            if self.state_ispending():
                yield {"message": "Pending in queue..."}
            elif self.state_isrunning():
                yield {"message": "Job running, waiting for its jobgate URL..."}
                return
            else:
                yield {"message": "Unknown status..."}
            await asyncio.sleep(1)
