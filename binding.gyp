# node-gyp build of the native addon (native/spillway_native.c): `npm run build:native`.
# Output: build/Release/spillway_native.node, loaded by src/block/native.ts.
{
  "targets": [
    {
      "target_name": "spillway_native",
      "sources": ["native/spillway_native.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
