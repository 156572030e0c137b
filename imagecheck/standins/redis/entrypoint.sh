#!/bin/sh
# The official redis image's entrypoint, as far as docker-compose.yml uses it: options
# alone run redis-server; redis-server runs as the redis user, in /data, and without
# protected mode unless a config file sets it (otherwise it answers only on loopback).
set -eu

case "${1:-}" in
    -*) set -- redis-server "$@" ;;
esac

if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

if [ "${1:-}" = redis-server ]; then
    shift
    config=
    if [ -f "${1:-}" ]; then
        config=$1
        shift
    fi
    if [ -n "$config" ] && grep -q '^protected-mode' "$config"; then
        set -- redis-server "$config" "$@"
    elif [ -n "$config" ]; then
        set -- redis-server "$config" --protected-mode no "$@"
    else
        set -- redis-server --protected-mode no "$@"
    fi
fi

exec "$@"
