//! How errors of the host layer (`stead-host`) become driver errors: what the host lacks
//! stays terminal (`Unsupported`), I/O stays I/O (retryable).

use stead_host::cgroup::CgroupError;

use crate::driver::DriverError;

impl From<CgroupError> for DriverError {
    fn from(e: CgroupError) -> Self {
        match e {
            CgroupError::Io { context, source } => DriverError::Io { context, source },
            CgroupError::Unsupported(m) => DriverError::Unsupported(m),
            e @ (CgroupError::Populated { .. } | CgroupError::Other(_)) => {
                DriverError::Other(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_errors_keep_their_class() {
        let missing = DriverError::from(CgroupError::Unsupported("no cpu controller".into()));
        assert!(missing.is_terminal());
        assert_eq!(
            missing.to_string(),
            "unsupported on this host: no cpu controller"
        );
        let io = DriverError::from(CgroupError::io(
            "write 1 to cgroup.kill",
            std::io::Error::from_raw_os_error(16),
        ));
        assert!(matches!(io, DriverError::Io { .. }) && io.retryable());
        assert_eq!(io.to_string(), "write 1 to cgroup.kill");
        let busy = DriverError::from(CgroupError::Populated {
            dir: "/sandbox/cgroup/memory/x".into(),
            pids: vec![1, 2],
        });
        assert!(busy.retryable());
        assert_eq!(
            busy.to_string(),
            "processes 1,2 in /sandbox/cgroup/memory/x"
        );
    }
}
