// Swagger UI on this server's own /openapi.json, with the key from the form on every request.
// The schema itself needs the key, so it is fetched through the same interceptor.

// Paths coglet lists but the gateway does not serve.
const HIDDEN_PATHS = ["/", "/shutdown"];
// What the gateway adds to coglet's API (README: "Following an async prediction").
const GET_PREDICTION = {
  summary: "Get an async prediction (gateway)",
  description: "The latest state of a prediction started here with `Prefer: respond-async` and no webhook, " +
    "for an hour; only to the key that started it. Its logs carry the denoising steps; its outputs are " +
    "paths on this server (`/predictions/{prediction_id}/outputs/0.png`), read with the same key.",
  parameters: [{ name: "prediction_id", in: "path", required: true, schema: { type: "string" } }],
  responses: {
    200: { description: "The prediction", content: { "application/json": { schema: { $ref: "#/components/schemas/PredictionResponse" } } } },
    404: { description: "Not started here with this key, or forgotten" },
  },
};
const GET_OUTPUT = {
  summary: "Get an output of an async prediction (gateway)",
  description: "One of the files GET /predictions/{prediction_id} lists; only to the key that started it, " +
    "for an hour at most (the oldest go first when the gateway's store is full).",
  parameters: [
    { name: "prediction_id", in: "path", required: true, schema: { type: "string" } },
    { name: "name", in: "path", required: true, schema: { type: "string" }, example: "0.png" },
  ],
  responses: {
    200: { description: "The file", content: { "image/png": {}, "image/jpeg": {}, "image/webp": {} } },
    404: { description: "Not started here with this key, or no longer kept" },
  },
};

function loadDocs() {
  const status = document.getElementById("status");
  status.textContent = "";
  SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: (request) => {
      Object.assign(request.headers, authHeaders());
      return request;
    },
    responseInterceptor: (response) => {
      if (response.url.endsWith("/openapi.json")) {
        if (response.status === 401) {
          status.textContent = "The server wants an API key: enter it above.";
        } else if (response.ok && response.body && response.body.paths) {
          HIDDEN_PATHS.forEach((path) => delete response.body.paths[path]);
          // Cog's own schema (what `cog build` writes) has no /predictions/{prediction_id}: add the
          // gateway's GET there, beside whatever the server lists.
          const paths = response.body.paths;
          paths["/predictions/{prediction_id}"] = { ...(paths["/predictions/{prediction_id}"] || {}), get: GET_PREDICTION };
          paths["/predictions/{prediction_id}/outputs/{name}"] = { get: GET_OUTPUT };
          response.text = JSON.stringify(response.body);
        }
      }
      return response;
    },
  });
}

bindKeyForm(document.getElementById("key-form"), document.getElementById("key"), loadDocs);
loadDocs();
