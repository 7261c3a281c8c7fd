//! What to launch: the flags checked, defaults filled in and paths made absolute
//! ([`JobSpec`]), and the template variables it renders.

use super::template::{sbatch_quote, shell_quote, Value};
use super::{LaunchArgs, LaunchError};
use jobgate_agent::jobfile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The settings a launch renders, checked and made absolute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSpec {
    /// Job name.
    pub job_name: String,
    /// Time limit.
    pub time: String,
    /// Output file pattern (`%j` = job id).
    pub output: String,
    /// Partition, account, CPUs, memory, GPUs: only those given.
    pub partition: Option<String>,
    /// Account.
    pub account: Option<String>,
    /// CPUs per task.
    pub cpus: Option<u32>,
    /// Memory.
    pub mem: Option<String>,
    /// GPUs.
    pub gpus: Option<String>,
    /// Directory the app starts in.
    pub workdir: String,
    /// The jobgate binary the job runs.
    pub jobgate: String,
    /// Relay address, CA, token file, image: passed to the agent when known.
    pub relay: Option<String>,
    /// Relay CA.
    pub relay_ca: Option<String>,
    /// Token file.
    pub token_file: Option<String>,
    /// Container image.
    pub sif: Option<String>,
    /// Options for `apptainer exec`.
    pub sif_options: Vec<String>,
    /// The agent's --ready-timeout, when given.
    pub ready_timeout: Option<u64>,
    /// JupyterLab instead of a command.
    pub jupyter: bool,
    /// The command, or `jupyter lab`'s extra arguments.
    pub app: Vec<String>,
}

impl JobSpec {
    /// The `#SBATCH` lines for the options given.
    pub fn sbatch_options(&self) -> Result<String, LaunchError> {
        let mut options: Vec<(&str, String)> = vec![
            ("job-name", self.job_name.clone()),
            ("time", self.time.clone()),
            ("output", self.output.clone()),
        ];
        let optional = [
            ("partition", self.partition.clone()),
            ("account", self.account.clone()),
            ("cpus-per-task", self.cpus.map(|n| n.to_string())),
            ("mem", self.mem.clone()),
            ("gpus", self.gpus.clone()),
        ];
        options.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        let lines: Result<Vec<String>, LaunchError> = options
            .into_iter()
            .map(|(flag, value)| {
                sbatch_quote(&value)
                    .map(|v| format!("#SBATCH --{flag}={v}"))
                    .ok_or_else(|| LaunchError::Usage(format!("--{flag} cannot hold a line break")))
            })
            .collect();
        Ok(lines?.join("\n"))
    }

    /// The agent's command line (each word shell-quoted).
    pub fn agent_argv(&self) -> Vec<String> {
        let mut argv = vec![self.jobgate.clone(), "agent".to_owned()];
        let mut flag = |name: &str, value: &Option<String>| {
            if let Some(value) = value {
                argv.push(format!("--{name}"));
                argv.push(value.clone());
            }
        };
        flag("relay", &self.relay);
        flag("relay-ca", &self.relay_ca);
        flag("token-file", &self.token_file);
        flag(
            "ready-timeout",
            &self.ready_timeout.map(|secs| secs.to_string()),
        );
        flag("sif", &self.sif);
        if self.sif.is_some() {
            for option in &self.sif_options {
                argv.push(format!("--sif-option={option}"));
            }
        }
        if self.jupyter {
            argv.push("--jupyter".to_owned());
        }
        if !self.app.is_empty() {
            argv.push("--".to_owned());
            argv.extend(self.app.iter().cloned());
        }
        argv
    }

    /// The template's variables.
    pub fn vars(&self) -> Result<BTreeMap<&'static str, Value>, LaunchError> {
        let word = |s: &str| Value::Word(s.to_owned());
        let opt = |s: &Option<String>| Value::Word(s.clone().unwrap_or_default());
        let quoted = |words: &[String]| {
            words
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Ok(BTreeMap::from([
            ("sbatch_options", Value::Raw(self.sbatch_options()?)),
            ("agent", Value::Raw(quoted(&self.agent_argv()))),
            ("app", Value::Raw(quoted(&self.app))),
            ("job_name", word(&self.job_name)),
            ("time", word(&self.time)),
            ("output", word(&self.output)),
            ("partition", opt(&self.partition)),
            ("account", opt(&self.account)),
            (
                "cpus",
                Value::Word(self.cpus.map(|n| n.to_string()).unwrap_or_default()),
            ),
            ("mem", opt(&self.mem)),
            ("gpus", opt(&self.gpus)),
            ("workdir", word(&self.workdir)),
            ("jobgate", word(&self.jobgate)),
            ("relay", opt(&self.relay)),
            ("relay_ca", opt(&self.relay_ca)),
            ("token_file", opt(&self.token_file)),
            ("sif", opt(&self.sif)),
            (
                "mode",
                word(if self.jupyter { "jupyter" } else { "command" }),
            ),
        ]))
    }

    /// What runs, for people.
    pub fn describe(&self) -> String {
        let app = self.app.join(" ");
        match (self.jupyter, app.is_empty()) {
            (true, true) => "jupyter lab".to_owned(),
            (true, false) => format!("jupyter lab {app}"),
            (false, _) => app,
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, LaunchError> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|e| LaunchError::Usage(format!("cannot find the current directory: {e}")))
}

fn path_text(path: &Path) -> Result<String, LaunchError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| LaunchError::Usage(format!("{} is not valid UTF-8", path.display())))
}

/// A job name from the program: letters, digits, `_.-`, at most 40.
fn default_job_name(jupyter: bool, app: &[String]) -> String {
    if jupyter {
        return "jupyter".into();
    }
    let program = app
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .unwrap_or("jobgate");
    let name: String = program
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(40)
        .collect();
    if name.is_empty() {
        "jobgate".into()
    } else {
        name
    }
}

fn check_value(flag: &str, value: &str) -> Result<(), LaunchError> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(LaunchError::Usage(format!(
            "--{flag} {value:?}: empty or with control characters"
        )));
    }
    Ok(())
}

/// Checks the flags and fills in defaults; `template` is the text (to see what it sets).
pub(super) fn job_spec(
    args: &LaunchArgs,
    template: &str,
) -> Result<(JobSpec, Vec<String>), LaunchError> {
    let mut warnings = Vec::new();
    if !args.jupyter && args.command.is_empty() {
        return Err(LaunchError::usage(
            "say what to run: --jupyter, or a command after `--` \
             (e.g. -- python3 -m http.server {port} --bind 127.0.0.1)",
        ));
    }
    if !args.jupyter
        && !args
            .command
            .iter()
            .any(|a| a.contains("{port}") || a.contains("{sock}"))
    {
        return Err(LaunchError::usage(
            "say where the app listens: put {port} (a free loopback port) or {sock} \
             (a private unix socket) in its arguments",
        ));
    }
    for (flag, value) in [
        ("partition", &args.partition),
        ("account", &args.account),
        ("mem", &args.mem),
        ("gpus", &args.gpus),
        ("job-name", &args.job_name),
    ] {
        if let Some(value) = value {
            check_value(flag, value)?;
        }
    }
    let time = args
        .time
        .clone()
        .unwrap_or_else(|| super::DEFAULT_TIME.to_owned());
    check_value("time", &time)?;
    if args.cpus == Some(0) {
        return Err(LaunchError::usage("--cpus must be at least 1"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            LaunchError::usage(
                "HOME is not set: the job hands its URL back through ~/.jobgate/jobs",
            )
        })?;
    let jobs_dir = PathBuf::from(home).join(jobfile::JOBS_DIR);
    let output = path_text(&jobs_dir.join("%j.out"))?;

    let workdir = match &args.workdir {
        Some(dir) => absolute(dir)?,
        None => std::env::current_dir()
            .map_err(|e| LaunchError::Usage(format!("no current directory: {e}")))?,
    };
    if !workdir.is_dir() {
        return Err(LaunchError::Usage(format!(
            "--workdir {}: not a directory",
            workdir.display()
        )));
    }
    let jobgate = std::env::current_exe()
        .map_err(|e| LaunchError::Usage(format!("cannot find the jobgate binary: {e}")))
        .and_then(|p| path_text(&p))?;

    // The relay: a flag or the environment, unless the template sets it itself.
    let relay = args.relay.clone().filter(|r| !r.is_empty());
    if relay.is_none() && !template.contains("JOBGATE_RELAY") {
        let message = "no relay: pass --relay HOST:PORT or set JOBGATE_RELAY (your admins \
                       know it)";
        if !args.dry_run {
            return Err(LaunchError::usage(message));
        }
        warnings.push(message.to_owned());
    }
    let relay_ca = match &args.relay_ca {
        Some(ca) => {
            let ca = absolute(ca)?;
            if !ca.is_file() {
                return Err(LaunchError::Usage(format!(
                    "--relay-ca {}: no such file",
                    ca.display()
                )));
            }
            Some(path_text(&ca)?)
        }
        None => None,
    };
    // The token: refuse now what the agent would refuse after the queue wait.
    let token_file = match &args.token_file {
        Some(path) => Some(absolute(path)?),
        None => None,
    };
    if !template.contains("JOBGATE_TOKEN_FILE") {
        if let Err(e) = jobgate_agent::token::load_token(token_file.clone()) {
            if !args.dry_run {
                return Err(LaunchError::Usage(e.to_string()));
            }
            warnings.push(e.to_string());
        }
    }
    let token_file = token_file.as_deref().map(path_text).transpose()?;
    let sif = match &args.sif {
        Some(image) => {
            let image = absolute(image)?;
            if !image.exists() {
                return Err(LaunchError::Usage(format!(
                    "--sif {}: no such image",
                    image.display()
                )));
            }
            Some(path_text(&image)?)
        }
        None => None,
    };
    let mut sif_options = args.sif_option.clone();
    if sif.is_some() && sif_options.is_empty() && args.gpus.is_some() {
        sif_options.push("--nv".into());
    }
    Ok((
        JobSpec {
            job_name: args
                .job_name
                .clone()
                .unwrap_or_else(|| default_job_name(args.jupyter, &args.command)),
            time,
            output,
            partition: args.partition.clone(),
            account: args.account.clone(),
            cpus: args.cpus,
            mem: args.mem.clone(),
            gpus: args.gpus.clone(),
            workdir: path_text(&workdir)?,
            jobgate,
            relay,
            relay_ca,
            token_file,
            sif,
            sif_options,
            ready_timeout: args.ready_timeout,
            jupyter: args.jupyter,
            app: args.command.clone(),
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::template::{render, template_source, TemplateSource, BUILTIN_TEMPLATE};
    use crate::launch::test_util::{bash_words, strings};

    fn spec() -> JobSpec {
        JobSpec {
            job_name: "python3".into(),
            time: "0:10:00".into(),
            output: "/home/u/.jobgate/jobs/%j.out".into(),
            partition: Some("debug".into()),
            cpus: Some(2),
            workdir: "/home/u/my project".into(),
            jobgate: "/usr/bin/jobgate".into(),
            relay: Some("relay.example.org:7443".into()),
            app: strings(&[
                "python3",
                "-m",
                "http.server",
                "{port}",
                "--bind",
                "127.0.0.1",
            ]),
            ..JobSpec::default()
        }
    }

    #[test]
    fn the_builtin_template_renders_a_valid_script() {
        let s = spec();
        let script = render(BUILTIN_TEMPLATE, &s.vars().expect("vars")).expect("render");
        assert!(script.starts_with("#!/bin/bash\n"));
        for line in [
            "#SBATCH --job-name=python3",
            "#SBATCH --time=0:10:00",
            "#SBATCH --output=/home/u/.jobgate/jobs/%j.out",
            "#SBATCH --partition=debug",
            "#SBATCH --cpus-per-task=2",
            "cd '/home/u/my project' || exit 1",
            "exec /usr/bin/jobgate agent --relay relay.example.org:7443 -- python3 -m http.server '{port}' --bind 127.0.0.1",
        ] {
            assert!(script.lines().any(|l| l == line), "{line:?} missing in:\n{script}");
        }
        assert!(!script.contains("--account"), "unset options stay out");
        assert!(!script.contains("--mem"));
        // sbatch reads #SBATCH lines only before the first command.
        let first_command = script
            .lines()
            .position(|l| !l.is_empty() && !l.starts_with('#'))
            .expect("a command");
        let last_sbatch = script
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.starts_with("#SBATCH"))
            .expect("sbatch");
        assert!(last_sbatch < first_command);
        let check = std::process::Command::new("bash")
            .args(["-n", "-c", &script])
            .status()
            .expect("bash -n");
        assert!(check.success());
    }

    #[test]
    fn the_agent_line_carries_the_app_word_for_word() {
        let mut s = spec();
        s.app = strings(&["app", "--title=it's $HOME", "{sock}"]);
        s.relay_ca = Some("/etc/ca dir/ca.pem".into());
        s.token_file = Some("/home/u/.tok".into());
        let vars = s.vars().expect("vars");
        let Some(Value::Raw(agent)) = vars.get("agent") else {
            panic!("agent is raw text")
        };
        assert_eq!(bash_words(agent), s.agent_argv());
        assert_eq!(
            s.agent_argv(),
            strings(&[
                "/usr/bin/jobgate",
                "agent",
                "--relay",
                "relay.example.org:7443",
                "--relay-ca",
                "/etc/ca dir/ca.pem",
                "--token-file",
                "/home/u/.tok",
                "--",
                "app",
                "--title=it's $HOME",
                "{sock}",
            ])
        );
    }

    #[test]
    fn a_slow_app_gets_its_ready_timeout_on_the_agent_line() {
        let mut s = spec();
        s.jupyter = true;
        s.app.clear();
        s.ready_timeout = Some(900);
        assert_eq!(
            s.agent_argv()[4..],
            strings(&["--ready-timeout", "900", "--jupyter"])
        );
    }

    #[test]
    fn jupyter_and_containers_on_the_agent_line() {
        let mut s = spec();
        s.jupyter = true;
        s.app = strings(&["--notebook-dir=/data"]);
        s.sif = Some("/images/lab.sif".into());
        s.sif_options = strings(&["--nv"]);
        assert_eq!(
            s.agent_argv()[4..],
            strings(&[
                "--sif",
                "/images/lab.sif",
                "--sif-option=--nv",
                "--jupyter",
                "--",
                "--notebook-dir=/data"
            ])
        );
        assert_eq!(s.describe(), "jupyter lab --notebook-dir=/data");
        s.app.clear();
        assert_eq!(s.agent_argv().last().map(String::as_str), Some("--jupyter"));
    }

    #[test]
    fn hostile_values_stay_inert_in_the_script() {
        let mut s = spec();
        s.job_name = "x\" --uid=0 \"".into();
        s.partition = Some("p q".into());
        s.workdir = "/tmp/$(touch /tmp/pwned)".into();
        let script = render(BUILTIN_TEMPLATE, &s.vars().expect("vars")).expect("render");
        assert!(
            script.contains(r#"#SBATCH --job-name="x\" --uid=0 \"""#),
            "{script}"
        );
        assert!(script.contains("cd '/tmp/$(touch /tmp/pwned)' || exit 1"));
        s.job_name = "a\nb".into();
        assert!(
            s.vars().is_err(),
            "a line break cannot become an #SBATCH line"
        );
    }

    #[test]
    fn template_precedence() {
        let dir = std::env::temp_dir().join(format!("jobgate-tpl-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).expect("dir");
        let user = dir.join("user.sbatch");
        let site = dir.join("site.sbatch");
        let candidates = [user.clone(), site.clone()];
        assert_eq!(template_source(None, &candidates), TemplateSource::Builtin);
        std::fs::write(&site, "#!/bin/bash\n").expect("site");
        assert_eq!(
            template_source(None, &candidates),
            TemplateSource::File(site.clone())
        );
        std::fs::write(&user, "#!/bin/bash\n").expect("user");
        assert_eq!(
            template_source(None, &candidates),
            TemplateSource::File(user)
        );
        let explicit = dir.join("mine");
        assert_eq!(
            template_source(Some(explicit.clone()), &candidates),
            TemplateSource::File(explicit)
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
