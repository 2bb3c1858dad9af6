//! Running one test on both stores: the embedded one and a real `redis-server` started for it.

use super::gateway::{ConfigBuilder, TestGateway};
use super::redis::RedisServer;
use super::upstream::Upstream;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// `kind = "memory"`
    Memory,
    /// `kind = "redis"`, on a server started for the test.
    Redis,
}

/// A gateway on `store` in front of an echo upstream, plus what is needed to start a second
/// instance on the same store.
pub struct Env {
    /// The gateway.
    pub gw: TestGateway,
    /// Its upstream (both `ai` and `app`).
    pub up: Upstream,
    /// The config text it runs on.
    pub config: String,
    /// The Redis server of a `Store::Redis` run (take it to stop Redis).
    pub redis: Option<RedisServer>,
}

impl Env {
    /// A gateway on `store` with the test config.
    pub async fn start(store: Store) -> Self {
        Self::with(store, |b| b).await
    }

    /// Like [`Env::start`], with the config builder adjusted by `f`.
    pub async fn with(store: Store, f: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Self {
        let up = Upstream::echo().await;
        let redis = (store == Store::Redis).then(RedisServer::start);
        let mut builder = ConfigBuilder::new(&up.url());
        if let Some(r) = &redis {
            builder = builder.store(&format!("kind = \"redis\"\nurl = \"{}\"", r.url()));
        }
        let config = f(builder).build();
        let gw = TestGateway::start(&config).await;
        Env { gw, up, config, redis }
    }

    /// Starts the gateway again on its config with `from` replaced by `to` (a setting the
    /// builder has no knob for); `from` must be in the config.
    pub async fn restart_with(&mut self, from: &str, to: &str) {
        let config = self.config.replace(from, to);
        assert_ne!(config, self.config, "the shipped config changed shape: {from:?} is gone");
        self.gw = TestGateway::start(&config).await;
        self.config = config;
    }

    /// Another gateway instance on the same store and config.
    pub async fn second_instance(&self) -> TestGateway {
        TestGateway::start(&self.config).await
    }
}

/// Each named `async fn name(store: Store)` becomes the tests `memory::name` and `redis::name`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::stores::Store::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::stores::Store::Redis).await
                }
            )*
        }
    };
}
