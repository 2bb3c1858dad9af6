#![allow(dead_code)]
pub mod backend;
pub mod browser;
pub mod faultproxy;
pub mod gateway;
pub mod http;
pub mod lostreply;
pub mod process;
pub mod receivers;
pub mod redis;
pub mod sentinel;
pub mod stores;
pub mod stripe;
pub mod tls;
pub mod upstream;
