"""The image check (`python -m imagecheck`): the Dockerfile's image built and run with
podman, then docker-compose.yml brought up with podman-compose (README: "Checked here
with podman")."""
