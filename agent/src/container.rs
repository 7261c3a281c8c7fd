//! Running the app inside an Apptainer/Singularity image (`jobgate agent --sif IMAGE`).
//!
//! The agent stays outside the container; only the app runs inside, through
//! `apptainer exec` (or `singularity exec`, whichever is installed on the node). The
//! container shares the node's network, so `{port}` on 127.0.0.1 works as is; the private
//! directory holding `{sock}` (and Jupyter's socket and token file) is bind-mounted at the
//! same path, so the app creates its socket where the agent looks for it.

use crate::child::PreparedApp;
use crate::target::Target;
use std::path::{Path, PathBuf};

/// The container runtimes tried, in order.
pub const RUNTIMES: [&str; 2] = ["apptainer", "singularity"];

/// How to run the app in a container image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// `apptainer` or `singularity` (a path).
    pub runtime: PathBuf,
    /// The image (`.sif` file, or anything `exec` accepts).
    pub image: String,
    /// Extra options for `exec`, before the image (`--nv`, `--bind /scratch`, ...).
    pub options: Vec<String>,
}

impl Container {
    /// Finds a runtime on `PATH` for `image`.
    pub fn find(image: String, options: Vec<String>) -> Result<Self, String> {
        let runtime = RUNTIMES
            .iter()
            .find_map(|name| crate::jupyter::find_program(name))
            .ok_or_else(|| {
                "--sif: neither apptainer nor singularity is on PATH on this node \
                 (module load apptainer?)"
                    .to_owned()
            })?;
        Ok(Self {
            runtime,
            image,
            options,
        })
    }

    /// The command line running `argv` in the image with each of `binds` mounted at the
    /// same path: `apptainer exec [options] --bind DIR ... IMAGE argv...`.
    pub fn wrap(&self, argv: &[String], binds: &[&Path]) -> Vec<String> {
        let mut wrapped = vec![self.runtime.to_string_lossy().into_owned(), "exec".into()];
        wrapped.extend(self.options.iter().cloned());
        for dir in binds {
            wrapped.push("--bind".into());
            wrapped.push(dir.to_string_lossy().into_owned());
        }
        wrapped.push(self.image.clone());
        wrapped.extend(argv.iter().cloned());
        wrapped
    }

    /// `prepared`'s command line run in the image, with the directory of its socket bound.
    pub fn wrap_app(&self, prepared: &PreparedApp) -> Vec<String> {
        self.wrap(&prepared.argv, &binds(prepared))
    }
}

/// The directories the app must see inside a container: where its socket goes (the
/// `{sock}` directory, or the directory of a `--to unix:` socket such as Jupyter's).
pub fn binds(prepared: &PreparedApp) -> Vec<&Path> {
    let mut binds: Vec<&Path> = prepared.private_dir.iter().map(PathBuf::as_path).collect();
    if let Target::Unix(sock) = &prepared.target {
        if let Some(dir) = sock.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !binds.contains(&dir) {
                binds.push(dir);
            }
        }
    }
    binds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_app_runs_in_the_image_with_its_socket_directory_bound() {
        let container = Container {
            runtime: "/usr/bin/apptainer".into(),
            image: "/images/lab.sif".into(),
            options: strings(&["--nv"]),
        };
        let argv = strings(&["jupyter", "lab", "--ServerApp.sock=/run/jg-1/jupyter.sock"]);
        assert_eq!(
            container.wrap(&argv, &[Path::new("/run/jg-1")]),
            strings(&[
                "/usr/bin/apptainer",
                "exec",
                "--nv",
                "--bind",
                "/run/jg-1",
                "/images/lab.sif",
                "jupyter",
                "lab",
                "--ServerApp.sock=/run/jg-1/jupyter.sock",
            ])
        );
    }

    #[test]
    fn socket_directories_are_bound_once() {
        let container = Container {
            runtime: "/usr/bin/apptainer".into(),
            image: "/i.sif".into(),
            options: Vec::new(),
        };
        // {sock}: the agent's private directory.
        let app = crate::child::prepare(strings(&["app", "--sock={sock}"]), None).expect("prepare");
        let dir = app.private_dir.clone().expect("private dir");
        let argv = container.wrap_app(&app);
        assert_eq!(
            argv[..4],
            strings(&[
                "/usr/bin/apptainer",
                "exec",
                "--bind",
                &dir.to_string_lossy()
            ])
        );
        assert_eq!(argv[4], "/i.sif");
        assert_eq!(
            argv[6],
            format!("--sock={}", dir.join("app.sock").display())
        );
        assert_eq!(argv.iter().filter(|a| *a == "--bind").count(), 1);
        crate::child::remove_private_dir(&dir);
        // --to unix:/dir/s.sock (Jupyter's socket): its directory.
        let app = crate::child::prepare(
            strings(&["jupyter", "lab"]),
            Some(Target::Unix("/run/jg-2/jupyter.sock".into())),
        )
        .expect("prepare");
        assert_eq!(binds(&app), vec![Path::new("/run/jg-2")]);
        // {port}: nothing to bind.
        let app = crate::child::prepare(strings(&["app", "{port}"]), None).expect("prepare");
        assert!(binds(&app).is_empty());
    }

    #[test]
    fn tcp_apps_need_no_bind() {
        let container = Container {
            runtime: "singularity".into(),
            image: "img.sif".into(),
            options: Vec::new(),
        };
        let argv = strings(&["python3", "-m", "http.server", "8000"]);
        assert_eq!(
            container.wrap(&argv, &[]),
            strings(&[
                "singularity",
                "exec",
                "img.sif",
                "python3",
                "-m",
                "http.server",
                "8000"
            ])
        );
    }
}
