"""Above the stages: `conductor` takes every unit of a profile through catalog, build, image and registry;
`inputs` says what a unit is built from and whether the registry already holds it; `assets` and `ocm`
make a versioned release's files and its OCM component."""
