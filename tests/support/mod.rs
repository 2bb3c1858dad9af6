#![allow(dead_code)]
pub mod browser;
pub mod faultproxy;
pub mod gateway;
pub mod http;
pub mod process;
pub mod receivers;
pub mod redis;
pub mod stores;
pub mod stripe;
pub mod upstream;
