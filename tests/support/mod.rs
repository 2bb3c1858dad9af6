#![allow(dead_code)]
pub mod gateway;
pub mod http;
pub mod redis;
pub mod upstream;
