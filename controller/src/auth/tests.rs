use super::*;

/// A cheap argon2id hash of `pw` (small parameters keep the tests fast).
pub(crate) fn quick_hash(pw: &str) -> String {
    let params = argon2::Params::new(256, 1, 1, None).expect("params");
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    a.hash_password(pw.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn session(role: Role) -> Principal {
    Principal {
        user: "u".into(),
        role,
        via: Via::Session,
        csrf: Some("c".repeat(64)),
        session: Some("s".into()),
    }
}

fn token() -> Principal {
    Principal {
        user: "token".into(),
        role: Role::Operator,
        via: Via::Token,
        csrf: None,
        session: None,
    }
}

#[test]
fn nobody_is_refused_with_401() {
    assert_eq!(
        decide(None, Need::Read, &Method::GET, None, None),
        Err(Denied::Unauthenticated)
    );
}

#[test]
fn a_viewer_reads_but_does_not_act() {
    let v = session(Role::Viewer);
    assert_eq!(
        decide(Some(&v), Need::Read, &Method::GET, None, None),
        Ok(())
    );
    let csrf = v.csrf.clone();
    assert_eq!(
        decide(
            Some(&v),
            Need::Operate,
            &Method::POST,
            csrf.as_deref(),
            None
        ),
        Err(Denied::Forbidden)
    );
}

#[test]
fn a_session_action_needs_the_sessions_csrf_token() {
    let o = session(Role::Operator);
    assert_eq!(
        decide(Some(&o), Need::Operate, &Method::POST, None, None),
        Err(Denied::Csrf)
    );
    assert_eq!(
        decide(Some(&o), Need::Operate, &Method::POST, Some("wrong"), None),
        Err(Denied::Csrf)
    );
    let csrf = o.csrf.clone();
    assert_eq!(
        decide(
            Some(&o),
            Need::Operate,
            &Method::POST,
            csrf.as_deref(),
            Some(true)
        ),
        Ok(())
    );
    assert_eq!(
        decide(
            Some(&o),
            Need::Operate,
            &Method::POST,
            csrf.as_deref(),
            Some(false)
        ),
        Err(Denied::CrossOrigin)
    );
}

#[test]
fn a_bearer_token_acts_without_csrf() {
    assert_eq!(
        decide(Some(&token()), Need::Operate, &Method::POST, None, None),
        Ok(())
    );
}

#[test]
fn users_files_are_parsed_and_bad_lines_named() {
    let h = quick_hash("pw");
    let text = format!("# ops\n\nann:operator:{h}\nbob:viewer:{h}\n");
    let users = parse_users(&text).expect("parse");
    assert_eq!(users.len(), 2);
    assert_eq!(users[0].role, Role::Operator);
    assert_eq!(users[1].name, "bob");
    for (bad, what) in [
        (format!("ann:admin:{h}"), "role"),
        ("ann:viewer:plain".to_string(), "PHC"),
        ("ann:viewer".to_string(), "name:role:hash"),
        (format!("a b:viewer:{h}"), "user name"),
        (format!("ann:viewer:{h}\nann:viewer:{h}"), "twice"),
        ("ann:viewer:$6$salt$abcdefghijklmnop".to_string(), "argon2"),
    ] {
        let err = parse_users(&bad).expect_err(&bad);
        assert!(err.contains(what), "{bad}: {err}");
    }
}

#[test]
fn the_config_needs_a_way_in_and_a_long_token() {
    assert!(UiConfig::new(None, vec![]).is_err());
    assert!(UiConfig::new(Some("short".into()), vec![]).is_err());
    let c = UiConfig::new(Some("0123456789abcdef".into()), vec![]).expect("ok");
    assert!(
        !format!("{c:?}").contains("0123456789abcdef"),
        "Debug hides the token"
    );
}

fn auth_with_user(role: Role) -> UiAuth {
    let users = vec![User {
        name: "ann".into(),
        role,
        hash: quick_hash("s3cret-pw"),
    }];
    UiAuth::new(UiConfig::new(Some("0123456789abcdef".into()), users).expect("cfg"))
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).expect("value"));
    }
    h
}

#[test]
fn login_opens_a_session_that_the_cookie_finds_and_logout_ends() {
    let a = auth_with_user(Role::Viewer);
    assert!(a.login("ann", "wrong").is_none());
    assert!(a.login("nobody", "s3cret-pw").is_none());
    let p = a.login("ann", "s3cret-pw").expect("login");
    assert_eq!(p.role, Role::Viewer);
    let sid = p.session.clone().expect("sid");
    assert_eq!(sid.len(), 64);
    let cookie = a.session_cookie(&sid);
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let h = headers(&[("cookie", &format!("theme=dark; {SESSION_COOKIE}={sid}"))]);
    let found = a.authenticate(&h).expect("session");
    assert_eq!(found.user, "ann");
    assert_eq!(found.csrf, p.csrf);
    a.logout(&sid);
    assert!(a.authenticate(&h).is_none());
}

#[test]
fn bearer_tokens_are_checked_and_a_wrong_one_is_nobody() {
    let a = auth_with_user(Role::Viewer);
    let ok = a
        .authenticate(&headers(&[("authorization", "Bearer 0123456789abcdef")]))
        .expect("token");
    assert_eq!((ok.role, ok.via), (Role::Operator, Via::Token));
    assert!(
        a.authenticate(&headers(&[("authorization", "Bearer 0123456789abcdeX")]))
            .is_none()
    );
    assert!(
        a.authenticate(&headers(&[("authorization", "Basic x")]))
            .is_none()
    );
    assert!(a.authenticate(&HeaderMap::new()).is_none());
}

#[test]
fn an_idle_session_expires() {
    let mut a = auth_with_user(Role::Operator);
    a.cfg.session_idle = Duration::from_millis(1);
    let p = a.login("ann", "s3cret-pw").expect("login");
    std::thread::sleep(Duration::from_millis(5));
    let h = headers(&[(
        "cookie",
        &format!("{SESSION_COOKIE}={}", p.session.unwrap_or_default()),
    )]);
    assert!(a.authenticate(&h).is_none());
}

#[test]
fn origins_are_compared_with_the_host() {
    assert_eq!(same_origin(&HeaderMap::new()), None);
    let h = headers(&[
        ("origin", "http://127.0.0.1:9464"),
        ("host", "127.0.0.1:9464"),
    ]);
    assert_eq!(same_origin(&h), Some(true));
    let h = headers(&[
        ("origin", "http://evil.example"),
        ("host", "127.0.0.1:9464"),
    ]);
    assert_eq!(same_origin(&h), Some(false));
    let h = headers(&[("origin", "null"), ("host", "127.0.0.1:9464")]);
    assert_eq!(same_origin(&h), Some(false));
}

#[test]
fn hashes_made_here_verify_and_tokens_are_random() {
    let h = hash_password("pw").expect("hash");
    assert!(h.starts_with("$argon2id$"), "{h}");
    assert_ne!(random_token(), random_token());
}
