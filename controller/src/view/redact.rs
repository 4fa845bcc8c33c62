//! Secret redaction for everything the UI and `/api/v1` show: desired specs, observed
//! state, diffs and plans.
//!
//! A value is secret when the key that holds it names a secret (`password`, `passwordHash`,
//! `secret`, `token`, `privateKey`, `credentials`, `apiKey`, `userData`, `vendorData`,
//! …) or when it is the value of a container environment variable (`env.NAME`): there is
//! no way to mark one variable as secret in a manifest, so every value is hidden and only
//! the names are shown.

use serde_json::Value;

/// What a secret value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Normalized key words (lowercase, without `-` and `_`) whose values are secret.
const SECRET_KEYS: [&str; 12] = [
    "password",
    "passwd",
    "passwordhash",
    "secret",
    "token",
    "privatekey",
    "credentials",
    "credential",
    "apikey",
    "userdata",
    "vendordata",
    "authorization",
];

/// Whether a key holds a secret: one of [`SECRET_KEYS`], or ending in `password`,
/// `secret`, `token` or `key` after a word that makes it one (`dbPassword`,
/// `clientSecret`, `accessToken`, `privateKey`).
pub fn secret_key(key: &str) -> bool {
    let k: String = key
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_KEYS.contains(&k.as_str())
        || k.ends_with("password")
        || k.ends_with("passwd")
        || k.ends_with("secret")
        || k.ends_with("token")
        || k.ends_with("privatekey")
        || k.ends_with("apikey")
}

/// Whether the value at `path` (JSON pointer segments) is secret: its own key names a
/// secret, or it is one variable of an `env` map.
pub fn secret_path<S: AsRef<str>>(path: &[S]) -> bool {
    let Some(last) = path.last() else {
        return false;
    };
    if secret_key(last.as_ref()) {
        return true;
    }
    path.len() >= 2 && path[path.len() - 2].as_ref() == "env"
}

/// `value` with every secret under it replaced by [`REDACTED`]; `path` is where `value`
/// sits (segments of a JSON pointer, empty for a whole document).
pub fn redacted<S: AsRef<str>>(path: &[S], value: &Value) -> Value {
    let mut p: Vec<String> = path.iter().map(|s| s.as_ref().to_string()).collect();
    let mut v = value.clone();
    redact_in_place(&mut p, &mut v);
    v
}

fn redact_in_place(path: &mut Vec<String>, v: &mut Value) {
    if secret_path(path) && !v.is_null() {
        *v = Value::String(REDACTED.into());
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                path.push(k.clone());
                redact_in_place(path, x);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                path.push(i.to_string());
                redact_in_place(path, x);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The segments of a JSON pointer (`/a/b~1c` → `a`, `b/c`).
pub fn pointer_segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// A diff value at `pointer` (relative to the spec), redacted.
pub fn redacted_at(pointer: &str, value: &Option<Value>) -> Option<Value> {
    value
        .as_ref()
        .map(|v| redacted(&pointer_segments(pointer), v))
}

/// A free-text message with any `KEY=value` pair whose key names a secret cut to
/// `KEY=<redacted>` (failure messages may quote a command line or an environment).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match word.split_once('=') {
            Some((k, _)) if secret_key(k.trim_start_matches('-')) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(word),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_keys_are_recognized_in_any_case_and_separator() {
        for k in [
            "password",
            "passwordHash",
            "password_hash",
            "DB_PASSWORD",
            "clientSecret",
            "accessToken",
            "privateKey",
            "userData",
            "vendor-data",
            "apiKey",
        ] {
            assert!(secret_key(k), "{k}");
        }
        for k in [
            "name",
            "memory",
            "sshAuthorizedKeys",
            "hostname",
            "keepLast",
            "mtu",
        ] {
            assert!(!secret_key(k), "{k}");
        }
    }

    #[test]
    fn env_values_and_secret_fields_are_redacted_everywhere_in_a_document() {
        let spec = json!({
            "env": {"TZ": "UTC", "DB_PASSWORD": "hunter2"},
            "cloudInit": {
                "users": [{"name": "ops", "passwordHash": "$6$salt$hash", "sshAuthorizedKeys": ["ssh-ed25519 AAA"]}],
                "userData": "#cloud-config\npassword: hunter2\n"
            },
            "memory": 1024
        });
        let r = redacted::<&str>(&[], &spec);
        let text = r.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("$6$salt$hash"), "{text}");
        assert!(!text.contains("UTC"), "env values are all hidden: {text}");
        assert_eq!(r["env"]["TZ"], REDACTED);
        assert_eq!(r["cloudInit"]["users"][0]["name"], "ops");
        assert_eq!(
            r["cloudInit"]["users"][0]["sshAuthorizedKeys"][0],
            "ssh-ed25519 AAA"
        );
        assert_eq!(r["memory"], 1024);
    }

    #[test]
    fn diff_values_are_redacted_by_their_pointer() {
        assert_eq!(
            redacted_at("/env/DB_PASSWORD", &Some(json!("x"))),
            Some(json!(REDACTED))
        );
        assert_eq!(
            redacted_at("/env", &Some(json!({"A": "x"}))),
            Some(json!({"A": REDACTED}))
        );
        assert_eq!(
            redacted_at("/cloudInit/users/0/passwordHash", &Some(json!("$6$x"))),
            Some(json!(REDACTED))
        );
        assert_eq!(redacted_at("/memory", &Some(json!(5))), Some(json!(5)));
        assert_eq!(redacted_at("/env/A", &None), None);
        assert_eq!(pointer_segments("/a/b~1c"), vec!["a", "b/c"]);
    }

    #[test]
    fn secret_pairs_in_messages_are_cut() {
        assert_eq!(
            redact_text("exec failed: env TOKEN=abc MODE=x --password=pw"),
            "exec failed: env TOKEN=<redacted> MODE=x --password=<redacted>"
        );
    }
}
