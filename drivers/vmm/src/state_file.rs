//! `<run_dir>/state.json`: what a VMM process reports about itself, rewritten on every
//! state change. One JSON object and a newline:
//! `{"pid":42,"state":"running","vcpus":2,"mem_bytes":67108864,"started_unix":1700000000,`
//! `"control_socket":"...","console_socket":"...","exit_reason":"..."}` (the last three only
//! when known).

use serde::{Deserialize, Serialize};

use crate::RunState;

/// The sockets a VMM process serves, as named in its state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StateSockets {
    /// The control socket's path.
    pub(crate) control: Option<String>,
    /// The serial console socket's path.
    pub(crate) console: Option<String>,
}

/// The content of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) pid: u32,
    pub(crate) state: RunState,
    pub(crate) vcpus: u8,
    pub(crate) mem_bytes: u64,
    pub(crate) started_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) control_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) console_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exit_reason: Option<String>,
}

impl StateFile {
    /// The file's bytes: the object on one line, then a newline.
    pub(crate) fn render(&self) -> String {
        let mut body = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        body.push('\n');
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        StateFile {
            pid: 42,
            state: RunState::Exited,
            vcpus: 2,
            mem_bytes: 64 << 20,
            started_unix: 1_700_000_000,
            control_socket: Some("/sandbox/vm/a/control.sock".into()),
            console_socket: Some("/sandbox/vm/a/console.sock".into()),
            exit_reason: Some("error: \"x\"\n\u{1}".into()),
        }
    }

    #[test]
    fn renders_the_bytes_the_hand_written_format_did() {
        // What the format string wrote before the state file was typed.
        let old = "{\"pid\":42,\"state\":\"exited\",\"vcpus\":2,\"mem_bytes\":67108864,\
                   \"started_unix\":1700000000,\
                   \"control_socket\":\"/sandbox/vm/a/control.sock\",\
                   \"console_socket\":\"/sandbox/vm/a/console.sock\",\
                   \"exit_reason\":\"error: \\\"x\\\"\\n\\u0001\"}\n";
        assert_eq!(sample().render(), old);
        let bare = StateFile {
            state: RunState::Running,
            control_socket: None,
            console_socket: None,
            exit_reason: None,
            ..sample()
        };
        assert_eq!(
            bare.render(),
            "{\"pid\":42,\"state\":\"running\",\"vcpus\":2,\"mem_bytes\":67108864,\
             \"started_unix\":1700000000}\n"
        );
    }

    #[test]
    fn parses_back() {
        let s = sample();
        assert_eq!(serde_json::from_str::<StateFile>(&s.render()).ok(), Some(s));
    }
}
