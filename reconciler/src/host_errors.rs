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
