//! A blocking client for the QEMU guest agent over its virtio-serial unix socket.
