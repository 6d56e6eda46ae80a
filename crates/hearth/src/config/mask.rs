//! The configuration as `hearth config print` shows it: secrets masked.

use super::Config;

/// What a masked secret reads as.
const MASK: &str = "********";

impl Config {
    /// This configuration with its secrets masked: the admin token, and the password of every
    /// URL (`mqtt://user:********@host`).
    pub fn masked(&self) -> Config {
        let mut c = self.clone();
        if !c.admin_token.is_empty() {
            c.admin_token = MASK.into();
        }
        for url in [&mut c.mqtt_url, &mut c.redis_url, &mut c.database_url] {
            *url = url
                .split(',')
                .map(mask_password)
                .collect::<Vec<_>>()
                .join(",");
        }
        c
    }
}

/// `scheme://user:password@host…` with the password masked (a URL without one unchanged).
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_masked() {
        let c = Config {
            admin_token: "a-very-secret-admin-token".into(),
            mqtt_url: "mqtt://hearth:pw1@a:1883,mqtt://b:1883".into(),
            redis_url: "redis+cluster://:pw2@r1:7000,r2:7000".into(),
            database_url: "postgres://hearth:p%40ss@db/hearth".into(),
            ..Config::default()
        };
        let m = c.masked();
        assert_eq!(m.admin_token, MASK);
        assert_eq!(m.mqtt_url, "mqtt://hearth:********@a:1883,mqtt://b:1883");
        assert_eq!(m.redis_url, "redis+cluster://:********@r1:7000,r2:7000");
        assert_eq!(m.database_url, "postgres://hearth:********@db/hearth");
        let text = toml::to_string(&m).unwrap();
        for secret in ["a-very-secret", "pw1", "pw2", "p%40ss"] {
            assert!(!text.contains(secret), "{secret} printed");
        }
        assert_eq!(Config::default().masked(), Config::default());
    }
}
